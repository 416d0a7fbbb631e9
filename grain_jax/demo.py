"""A short end-to-end rescaling on a bundled image, with freshly initialised weights.

Downscales samples/astronaut_face.png (resized to the small config's 64x64) to a 4x4 8-bit
PNG, reads the PNG back, upscales it, and checks that the PNG path gives exactly the
in-memory result. With random weights the pictures are noise: this shows the pipeline runs
(and how fast), not GRAIN's quality; real results need converted weights or training.
The weights are saved as OUT/weights, a checkpoint for `python -m grain_jax.rescale` and
`python -m grain_jax.evaluate`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from PIL import Image


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
  parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  from configs import grain_small
  from grain_jax.api import Grain, enable_compilation_cache
  from grain_jax.model import GRAIN, NETWORKS, init_variables
  from grain_jax import images
  from grain_jax.rescaler import lr_to_uint8, uint8_to_lr
  from grain_jax.weights import save_weights

  enable_compilation_cache()
  cfg = grain_small.model_config()
  hr = cfg.hr_size
  model = GRAIN.from_config(cfg)
  variables = init_variables(model, args.seed, hr)
  grain = Grain({"grain": variables}, cfg, NETWORKS)

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sample = os.path.join(root, "samples", "astronaut_face.png")
  x = images.to_model(images.resize_square(images.read_image(sample)[0], hr))[None]
  os.makedirs(args.out, exist_ok=True)
  weights_dir = save_weights(os.path.join(args.out, "weights"), {"grain": variables}, cfg,
                             list(NETWORKS), {"init": f"random, seed {args.seed}"}, force=True)

  t = time.perf_counter()
  lr = grain.downscale(x)
  lr_path = os.path.join(args.out, "lr.png")
  Image.fromarray(lr_to_uint8(lr)[0]).save(lr_path)
  out_mem = grain.upscale(lr)
  lr_png = uint8_to_lr(np.asarray(Image.open(lr_path)))[None]
  out_png = grain.upscale(lr_png)
  jax.block_until_ready(out_png)
  elapsed = time.perf_counter() - t

  exact = all(np.array_equal(out_mem[k], out_png[k]) for k in out_mem)
  to_u8 = lambda a: images.to_uint8(a[0])
  lr_big = np.asarray(Image.fromarray(lr_to_uint8(lr)[0]).resize((hr, hr), Image.NEAREST))
  panel = np.concatenate([to_u8(x), lr_big] + [to_u8(out_png[k]) for k in ("hr_inv", "hr_gan", "hr")], 1)
  Image.fromarray(panel).save(os.path.join(args.out, "comparison.png"))
  print(f"{hr}x{hr} -> {cfg.lr_size}x{cfg.lr_size} -> {hr}x{hr} with random weights, "
        f"{elapsed:.1f} s incl. compilation")
  print(f"wrote {lr_path} and {os.path.join(args.out, 'comparison.png')} "
        f"(input | LR | hr_inv | hr_gan | hr)")
  print(f"upscaling the saved PNG equals the in-memory result: {exact}")
  print(f"random-weights checkpoint for the other tools: {weights_dir}, e.g.\n"
        f"  python -m grain_jax.rescale down --checkpoint {weights_dir} samples --out "
        f"{os.path.join(args.out, 'lr')}")
  return 0 if exact else 1


if __name__ == "__main__":
  sys.exit(main())
