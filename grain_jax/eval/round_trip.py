"""`grain-jax demo`: a one-minute rescaling round trip on a bundled face, with freshly
initialised weights.

Downscales grain_jax/samples/astronaut_face.png (resized to the small config's 64x64) to a 4x4
8-bit PNG, reads the PNG back, upscales it, and checks that the PNG path gives exactly the
in-memory result. With random weights the pictures are noise: this shows the pipeline runs
(and how fast), not GRAIN's quality; real results need converted weights or training
(`grain-jax train --config demo`). The weights are saved as OUT/weights, a checkpoint for
`grain-jax down|up|evaluate`.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from grain_jax.eval import metrics
from grain_jax.eval.report import comparison_grid
from grain_jax.formats import images
from grain_jax.formats.weights import check_target, save_weights
from grain_jax.inference import LoadedModel, read_image
from grain_jax.nets import model
from grain_jax.nets.model_config import grain_small
from grain_jax.nets.quantizer import lr_to_uint8, uint8_to_lr
from grain_jax.util import files

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples",
                      "astronaut_face.png")


def run(out: str, seed: int = 0) -> int:
  """The round trip into folder `out`; returns 0 if the PNG path matches the in-memory one."""
  # Before any work: OUT must be writable, and OUT/weights a folder the demo may replace (its
  # own weights from an earlier run, or empty): a folder of the user's is never deleted.
  files.check_can_create(out)
  try:
    weights_path = check_target(os.path.join(out, "weights"), force=True)
  except FileExistsError as e:
    raise FileExistsError(f"{e} (the demo saves its weights as OUT/weights)") from None
  cfg = grain_small()
  hr = cfg.hr_size
  tree = model.per_network_variables(model.init_variables(model.GRAIN.from_config(cfg), seed))
  loaded = LoadedModel(tree, cfg)
  x = read_image(SAMPLE, hr)
  os.makedirs(out, exist_ok=True)
  weights_dir = save_weights(weights_path, tree, cfg,
                             {"init": f"random, seed {seed}"}, force=True)

  t = time.perf_counter()
  lr = loaded.downscale(x)
  lr_path = os.path.join(out, "lr.png")
  Image.fromarray(lr_to_uint8(lr)[0]).save(lr_path)
  out_mem = loaded.upscale(lr)
  out_png = loaded.upscale(uint8_to_lr(np.asarray(Image.open(lr_path)))[None])
  jax.block_until_ready(out_png)
  elapsed = time.perf_counter() - t

  exact = all(np.array_equal(out_mem[k], out_png[k]) for k in out_mem)
  to_u8 = lambda a: images.to_uint8(a[0])
  # The project's comparison layout (report.COLUMNS), 3x enlarged; the weights are random.
  panels = {"lr": lr_to_uint8(lr)[0],
            "bicubic": to_u8(metrics.bicubic_baseline(jnp.asarray(x), cfg.lr_size)[1]),
            **{k: to_u8(out_png[k]) for k in ("hr_inv", "hr_gan", "hr")}, "gt": to_u8(x)}
  notes = {k: "random weights" for k in ("hr_inv", "hr_gan", "hr")}
  images.write_png(os.path.join(out, "comparison.png"),
                   comparison_grid([panels], 3, notes=notes))
  print(f"{hr}x{hr} -> {cfg.lr_size}x{cfg.lr_size} -> {hr}x{hr} with random weights, "
        f"{elapsed:.1f} s incl. compilation")
  print(f"wrote {lr_path} and {os.path.join(out, 'comparison.png')} "
        f"(LR | bicubic | hr_inv | hr_gan | hr | input)")
  print(f"upscaling the saved PNG equals the in-memory result: {exact}")
  print(f"random-weights checkpoint for the other commands: {weights_dir}, e.g.\n"
        f"  grain-jax down --checkpoint {weights_dir} {SAMPLE} --out {os.path.join(out, 'lr')}")
  return 0 if exact else 1

