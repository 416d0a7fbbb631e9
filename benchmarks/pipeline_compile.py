"""Compiles the first training programs of each stage of a pipeline config, exactly as
`grain-jax pipeline` builds the stages, without data or weights (placeholder values of the
right shapes, as `grain-jax bench --compile_only`): whether the stages of a configuration
compile here, how long that takes, and XLA's memory plan of each program.

    python benchmarks/pipeline_compile.py [--config grain1024] [--stages invrrdb] \
        [--config.batch_size=4 ...]

Step 0's programs are compiled: the discriminator update (when the stage has one), its lazy
R1 (stages 2-4) and the generator step. The 1024 stages take minutes each on a CPU.
"""
import argparse
import sys
import time

import jax
import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="grain1024", help="a pipeline config (name or file)")
  p.add_argument("--stages", default="invrrdb", help="comma-separated stages of it ('' = all)")
  args, overrides = p.parse_known_args(argv)
  from grain_jax.cli import config_flags
  from grain_jax.train import initial_weights, losses, stages
  from grain_jax.train.config import check_pipeline, stage_config
  from grain_jax.train.step import create_training

  cfg = config_flags.load(args.config, overrides)
  check_pipeline(cfg)
  names = [s for s in args.stages.split(",") if s] or list(cfg.pipeline.stages)
  print(f"{jax.devices()[0].device_kind}; {args.config} at {cfg.model.hr_size} <-> "
        f"{cfg.model.lr_size}")
  for name in names:
    stages.get(name)
    t = stage_config(cfg, name)
    n = t.batch_size or jax.device_count()
    variables, d_vars, loss_vars, _ = initial_weights.initial_variables(t, placeholders=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    training = create_training(t, variables, d_vars, loss_vars, mesh)
    hr = int(t.model.hr_size)
    batch = {k: np.zeros((n, hr, hr, 3), np.float32) for k in "xy"}
    t0 = time.perf_counter()
    _, compiled = training.step.compile(training.state, batch, loss_vars)
    seconds = time.perf_counter() - t0
    on = [k for k, w in t.loss.items()  # a loss without its network's weights is off
          if w > 0 and set(losses.LOSSES[k].networks) <= set(loss_vars)]
    plans = []
    for program in compiled:
      m = program.memory_analysis()
      plans.append((m.argument_size_in_bytes + m.output_size_in_bytes
                    + m.temp_size_in_bytes) / 2**30 if m else float("nan"))
    print(f"  {name}: batch {n}, programs {', '.join(training.step.due(0))} compiled in "
          f"{seconds:.1f} s; XLA memory plan {', '.join(f'{g:.2f}' for g in plans)} GiB; "
          f"losses {', '.join(on)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
