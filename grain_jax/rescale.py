"""Rescale your own pictures: HR images -> 8-bit LR PNGs, and LR PNGs -> HR PNGs.

    python -m grain_jax.rescale down --checkpoint CKPT INPUT... --out DIR
    python -m grain_jax.rescale up   --checkpoint CKPT LR_PNG... --out DIR

INPUT and LR_PNG are image files or folders (searched recursively; the folder structure is
kept under DIR). CKPT is a converted weights directory (convert_weights.py) or a training
workdir (train.py). Outputs are PNGs named after their inputs: NAME.png (the LR image for
`down`, the final HR image for `up`; `up --save hr,hr_inv,hr_gan` adds NAME_hr_inv.png and
NAME_hr_gan.png).

`down` takes any size: images that are not HR x HR (1024x1024 for the published model) are
center-cropped to a square and resized with antialiased bicubic interpolation (with a
warning). Grayscale, palette, RGBA (composited onto white) and 16-bit images are converted
to RGB. The LR file holds GRAIN's LR image exactly (8-bit levels), so `up` on it gives
exactly what upscaling the in-memory LR gives.

`up` refuses LR files of another size than the checkpoint's LR size.

An unreadable or refused file is reported by name and skipped; all other files are still
processed, and the exit status is 1 if any file failed (2 for a bad command or checkpoint).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys

import numpy as np
from PIL import Image

from grain_jax import data as data_lib
from grain_jax import images
from grain_jax.rescaler import lr_to_uint8, uint8_to_lr

UPSCALE_OUTPUTS = ("hr", "hr_inv", "hr_gan")


def read_lr(path: str, lr_size: int) -> tuple[np.ndarray, str | None]:
  """An LR PNG -> (lr, lr, 3) float32 on the 8-bit grid in [-1, 1], plus a conversion note.

  Raises ImageError if unreadable or not lr_size x lr_size.
  """
  try:
    with Image.open(path) as img:
      if img.size != (lr_size, lr_size):
        raise images.ImageError(
            f"{path}: {img.size[0]}x{img.size[1]} is not an LR image of this checkpoint "
            f"({lr_size}x{lr_size}); make LR files with `rescale down`")
      img.load()
      rgb01, note = images.decode(img)
  except (OSError, ValueError, SyntaxError) as e:
    if isinstance(e, images.ImageError):
      raise
    raise images.ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
  u8 = np.clip(np.round(rgb01 * 255.0), 0, 255).astype(np.uint8)
  return uint8_to_lr(u8), note


def rescale(direction: str, grain, inputs: list[str], out_dir: str, batch_size: int = 1,
            save: tuple[str, ...] = ("hr",), workers: int = 4, progress: bool = True) -> int:
  """Runs `down` or `up` over files and folders; returns the number of failed inputs."""
  from tqdm import tqdm

  grain.require("downscale" if direction == "down" else "upscale")
  hr, lr = grain.hr_size, grain.lr_size
  out_dir = os.path.abspath(out_dir)
  files, missing = [], []
  for item in inputs:
    if os.path.exists(item):
      files += images.find_images([item])
    else:
      missing.append(item)
  names = images.output_names(files)
  suffixes = [""] if direction == "down" else [
      "" if k == "hr" else f"_{k}" for k in save]
  targets = {os.path.realpath(os.path.join(out_dir, os.path.splitext(n)[0] + s + ".png"))
             for n in names for s in suffixes}
  clash = [f.path for f in files if os.path.realpath(f.path) in targets]
  if clash:
    raise ValueError(f"writing to {out_dir} would overwrite the input {clash[0]}; "
                     f"choose another --out")

  bar = tqdm(total=len(files), unit="img", desc=f"rescale {direction}", disable=not progress,
             file=sys.stderr)
  report = data_lib.Report(lambda s: tqdm.write(s, file=sys.stderr))
  for m in missing:
    report.fail(m, "no such file or folder")

  def load(i):
    if direction == "up":
      return read_lr(files[i].path, lr)
    img, note = images.read_image(files[i].path)
    if img.shape[:2] != (hr, hr):
      report.resized(files[i].name, img.shape, hr)
    return images.to_model(images.resize_square(img, hr)), note

  def run(batch):
    x = data_lib.pad_batch(batch, batch_size)
    if direction == "down":
      return {"": lr_to_uint8(grain.downscale(x))}
    out = grain.upscale(x)
    return {("" if k == "hr" else f"_{k}"): images.to_uint8(out[k]) for k in save}

  def write(idx, result):
    for j, i in enumerate(idx):
      stem = os.path.join(out_dir, os.path.splitext(names[i])[0])
      for suffix, arr in result.items():
        images.write_png(stem + suffix + ".png", arr[j])

  def on_error(i, err):
    report.fail(files[i].name, err)
    bar.update(1)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers // 2)) as writer:
    writes = []
    stream = data_lib.prefetch(load, range(len(files)), workers, 2 * batch_size + 4)
    for group in data_lib.batches(stream, batch_size, on_error):
      for i, (_, note) in group:
        report.note(files[i].name, note)
      idx = [i for i, _ in group]
      writes.append(writer.submit(write, idx, run([arr for _, (arr, _) in group])))
      bar.update(len(group))
    for w in writes:
      w.result()  # a write error (disk full, permissions) is not swallowed
  bar.close()
  done = len(files) - (len(report.failed) - len(missing))
  failed = ", ".join(f["file"] for f in report.failed)
  print(f"{direction}: wrote {done} of {len(files) + len(missing)} inputs to {out_dir}"
        + (f"; {len(report.failed)} failed: {failed}" if failed else ""), file=sys.stderr)
  return len(report.failed)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m grain_jax.rescale", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="direction", required=True, metavar="{down,up}")
  for direction, what in (("down", "HR images -> 8-bit LR PNGs"),
                          ("up", "LR PNGs -> HR PNGs")):
    p = sub.add_parser(direction, help=what, description=what)
    p.add_argument("--checkpoint", required=True,
                   help="converted weights directory (convert_weights.py) or training "
                        "workdir (train.py; its latest weights)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders" if direction == "down" else
                   "LR PNG files or folders (made by `rescale down`)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--batch_size", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--workers", type=int, default=4, help="background I/O threads")
    p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: mixed precision (float32 weights, faster on GPU/TPU)")
    if direction == "up":
      p.add_argument("--save", default="hr",
                     help="comma-separated outputs to write: hr (final, NAME.png), hr_inv "
                          "(rescaler, NAME_hr_inv.png), hr_gan (StyleGAN2, NAME_hr_gan.png); "
                          "default: hr")
  args = parser.parse_args(argv)
  save = tuple(s.strip() for s in getattr(args, "save", "hr").split(",") if s.strip())
  bad = [s for s in save if s not in UPSCALE_OUTPUTS]
  if bad or not save:
    parser.error(f"--save: unknown output(s) {bad}; choose from {', '.join(UPSCALE_OUTPUTS)}")
  if args.batch_size < 1:
    parser.error("--batch_size must be >= 1")

  from grain_jax.api import enable_compilation_cache, load
  enable_compilation_cache()
  try:
    grain = load(args.checkpoint, args.compute_dtype)
    failed = rescale(args.direction, grain, args.inputs, args.out, args.batch_size, save,
                     args.workers)
  except (OSError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
