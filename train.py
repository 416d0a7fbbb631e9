"""Trains GRAIN: the same as `grain-jax train` (see --help), for use inside the clone.

    python train.py --config configs/demo.py --workdir demo_run
"""
import sys

from grain_jax import cli

if __name__ == "__main__":
  sys.exit(cli.run_command("train", prog="python train.py"))
