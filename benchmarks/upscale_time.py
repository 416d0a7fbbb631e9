"""Times grain_jax.Grain.downscale / upscale (after compilation) on this machine's JAX device.

    python benchmarks/upscale_time.py [--config configs/grain_1024.py] [--batch 1] [--repeats 3]

Weights are random (shapes from the config), which does not change the cost.
"""
import argparse
import importlib.util
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grain_jax.api import Grain  # noqa: E402
from grain_jax.model import GRAIN, NETWORKS, placeholder_variables  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "grain_1024.py"))
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  spec = importlib.util.spec_from_file_location("cfg", a.config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config().model
  model = GRAIN.from_config(cfg)
  g = Grain({"grain": placeholder_variables(model, cfg.hr_size)}, cfg, NETWORKS)
  x = np.random.default_rng(1).uniform(-1, 1, (a.batch, cfg.hr_size, cfg.hr_size, 3)).astype(np.float32)
  for name, fn, arg in (("downscale", g.downscale, x), ("upscale", g.upscale, None)):
    arg = g.downscale(x) if arg is None else arg
    t = time.perf_counter()
    jax.block_until_ready(fn(arg))
    first = time.perf_counter() - t
    times = []
    for _ in range(a.repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(arg))
      times.append(time.perf_counter() - t)
    print(f"{name:9s} {cfg.hr_size}px batch {a.batch}: first call {first:.1f} s (compile+run), "
          f"then median {np.median(times):.2f} s  [{jax.devices()[0].device_kind}]")


if __name__ == "__main__":
  main()
