"""`python -m grain_jax SUBCOMMAND ...`: the grain-jax command without installing it."""
import sys

from grain_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main(prog="python -m grain_jax"))
