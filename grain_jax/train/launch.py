"""Trains one GRAIN stage per config, or a pipeline of stages (grain-jax pipeline), such as the
CPU demo:

    grain-jax train --config demo --workdir demo_run
    grain-jax train --config invrrdb --workdir runs/stage1 \\
        --config.data.train=/data/celeba_hq/train --config.init.weights=weights/grain1024
    grain-jax train --config configs/stage2_fea2code.py --workdir runs/stage2 \\
        --config.data.train=... --config.init.previous_workdir=runs/stage1

Any config field can be overridden: --config.batch_size=8 --config.max_steps=1000;
`--config NAME --show_config` lists every field. Running the same command again resumes from
the workdir's latest checkpoint. On several hosts, run the same command on each with
--multihost (or --coordinator_address, --num_processes, --process_id); batches are split over
all devices of all hosts, and the training is that of one process with all those devices.
(`train` here: the quick start for a config with `demo` (quickstart.py), stages in sequence
for one with `pipeline` (pipeline.py), else one stage (loop.py).)
"""
from __future__ import annotations

import ml_collections

from grain_jax.train import loop, pipeline, quickstart
from grain_jax.train.config import is_pipeline


def train(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True,
          pipeline_only: bool = False, name: str = "the config") -> None:
  """Trains what `cfg` describes in `workdir` (resuming what an earlier run left there).
  pipeline_only: refuse one stage's config (`grain-jax pipeline`), naming it `name`."""
  if cfg.get("demo"):
    quickstart.run(cfg, workdir, progress=progress)
  elif is_pipeline(cfg):
    pipeline.run(cfg, workdir, progress=progress)
  elif pipeline_only:
    raise ValueError(f"{name} is one stage's config, not a pipeline's (grain1024, demo, or a "
                     f"file built on grain_jax.train.config.pipeline_config): train it with "
                     f"grain-jax train")
  else:
    loop.train_and_evaluate(cfg, workdir, progress=progress)
