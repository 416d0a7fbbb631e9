"""Trains GRAIN: one stage per config, or the whole CPU demo (configs/demo.py).

    python train.py --config configs/stage1_invrrdb.py --workdir runs/stage1 \
        --config.data.train=/data/celeba_hq/train --config.init.weights=weights/grain1024
    python train.py --config configs/demo.py --workdir demo_run

Any config field can be overridden: --config.batch_size=8 --config.max_steps=1000.
Running the same command again resumes from the workdir's latest checkpoint. On several
hosts, run the same command on each (jax.distributed.initialize is called when
--multihost is given); batches are split over all devices of all hosts.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and weights go")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                      stream=sys.stderr)
  logging.getLogger("absl").setLevel(logging.WARNING)
  from grain_jax.api import enable_compilation_cache
  enable_compilation_cache()
  cfg = FLAGS.config
  try:
    if cfg.get("demo"):
      from grain_jax import demo_training
      demo_training.run(cfg, FLAGS.workdir, progress=FLAGS.progress)
    else:
      from grain_jax import trainer
      trainer.train_and_evaluate(cfg, FLAGS.workdir, progress=FLAGS.progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
