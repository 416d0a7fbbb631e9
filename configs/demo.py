"""The CPU demo: all four GRAIN stages at 64 px -> 4 px (16x per side) in a few minutes.

    python train.py --config configs/demo.py --workdir demo_run
    grain-jax train --config demo --workdir demo_run        # the same, built in

The built-in config `demo` (grain_jax/configs/demo.py says what it holds); edit this copy to
change it, e.g. the time budget or (with pipeline.budget_s = 0) the steps per stage.
"""
from grain_jax.configs import demo


def get_config():
  c = demo.get_config()
  # c.pipeline.budget_s = 1200.0
  return c
