"""Converts PyTorch weights: the same as `grain-jax convert` (see --help), inside the clone.

    python convert_weights.py --stylegan2 stylegan2-ffhq-config-f.pt ... --out weights/grain1024
"""
import sys

from grain_jax import cli

if __name__ == "__main__":
  sys.exit(cli.run_command("convert", prog="python convert_weights.py"))
