"""Rescale your own pictures: HR images -> 8-bit LR PNGs, and LR PNGs -> HR PNGs.

    grain-jax down --checkpoint CKPT INPUT... --out DIR
    grain-jax up   --checkpoint CKPT LR_PNG... --out DIR

INPUT and LR_PNG are image files or folders (searched recursively; the folder structure is
kept under DIR). CKPT is a converted weights directory (grain-jax convert) or a training
workdir (grain-jax train). Outputs are PNGs named after their inputs: NAME.png (the LR image for
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

import concurrent.futures
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from grain_jax import inference
from grain_jax.formats import images
from grain_jax.nets.quantizer import lr_to_uint8, uint8_to_lr
from grain_jax.util import prefetch
from grain_jax.util.files import check_can_create, check_writable
from grain_jax.util.progress import progress_bar

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
            f"({lr_size}x{lr_size}); make LR files with `grain-jax down`")
      img.load()
      rgb01, note = images.decode(img)
  except (OSError, ValueError, SyntaxError) as e:
    if isinstance(e, images.ImageError):
      raise
    raise images.ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
  u8 = np.clip(np.round(rgb01 * 255.0), 0, 255).astype(np.uint8)
  return uint8_to_lr(u8), note


def _suffixes(direction: str, save) -> list[str]:
  """Output file suffixes: NAME.png for the LR (down) or hr (up), NAME_hr_inv.png, ..."""
  return [""] if direction == "down" else ["" if k == "hr" else f"_{k}" for k in save]


def plan(direction: str, inputs: list[str], out_dir: str, save=("hr",)):
  """(input files, their output names, inputs that do not exist); refuses before anything is
  written if there is no image at all, two inputs share an output name or an output would
  overwrite an input."""
  files, missing = images.collect_inputs(inputs)
  names = images.output_names(files)
  targets = {os.path.realpath(os.path.join(out_dir, os.path.splitext(n)[0] + s + ".png"))
             for n in names for s in _suffixes(direction, save)}
  clash = [f.path for f in files if os.path.realpath(f.path) in targets]
  if clash:
    raise ValueError(f"writing to {out_dir} would overwrite the input {clash[0]}; "
                     f"choose another --out")
  return files, names, missing


def rescale(direction: str, loaded, inputs: list[str], out_dir: str, batch_size: int = 1,
            save: tuple[str, ...] = ("hr",), workers: int = 4, progress: bool = True) -> int:
  """Runs `down` or `up` with a LoadedModel over files and folders; returns the number of
  failed inputs."""
  planned = plan(direction, inputs, os.path.abspath(out_dir), save)
  return _rescale_planned(direction, loaded, planned, out_dir, batch_size, save, workers,
                          progress)


def _rescale_planned(direction: str, loaded, planned, out_dir: str, batch_size: int,
                     save: tuple[str, ...], workers: int, progress: bool) -> int:
  """`rescale` of the files `plan` found."""
  loaded.require("downscale" if direction == "down" else "upscale")
  hr, lr = loaded.hr_size, loaded.lr_size
  files, names, missing = planned
  out_dir = check_writable(out_dir)
  bar = progress_bar(len(files), f"rescale {direction}", "img", progress)
  report = prefetch.Report(lambda s: tqdm.write(s, file=sys.stderr))
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
    x = prefetch.pad_batch(batch, batch_size)
    if direction == "down":
      return [lr_to_uint8(loaded.downscale(x))]
    out = loaded.upscale(x)
    return [images.to_uint8(out[k]) for k in save]

  def write(idx, result):
    for j, i in enumerate(idx):
      stem = os.path.join(out_dir, os.path.splitext(names[i])[0])
      for suffix, arr in zip(_suffixes(direction, save), result):
        images.write_png(stem + suffix + ".png", arr[j])

  def on_error(i, err):
    report.fail(files[i].name, err)
    bar.update(1)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers // 2)) as writer:
    writes = []
    stream = prefetch.prefetch(load, range(len(files)), workers, 2 * batch_size + 4)
    for group in prefetch.batches(stream, batch_size, on_error):
      for i, (_, note) in group:
        report.note(files[i].name, note)
      writes.append(writer.submit(write, [i for i, _ in group],
                                  run([arr for _, (arr, _) in group])))
      bar.update(len(group))
    for w in writes:
      w.result()  # a write error (disk full, permissions) is not swallowed
  bar.close()
  done = len(files) - (len(report.failed) - len(missing))
  failed = ", ".join(f["file"] for f in report.failed)
  print(f"{direction}: wrote {done} of {len(files) + len(missing)} inputs to {out_dir}"
        + (f"; {len(report.failed)} failed: {failed}" if failed else ""), file=sys.stderr)
  return len(report.failed)


def run(direction: str, checkpoint: str, inputs: list[str], out_dir: str, batch_size: int = 1,
        save: tuple[str, ...] = ("hr",), workers: int = 4, compute_dtype: str = "float32",
        progress: bool = True, inference_chunk: int = 0) -> int:
  """`grain-jax down|up`: checks the request (the outputs asked for, the batch size, the
  inputs and `out_dir`) before the model is loaded, loads `checkpoint` and rescales; returns
  the number of failed inputs."""
  bad = [s for s in save if s not in UPSCALE_OUTPUTS]
  if bad or not save:
    raise ValueError(f"--save: unknown output(s) {bad}; choose from "
                     f"{', '.join(UPSCALE_OUTPUTS)}")
  if batch_size < 1:
    raise ValueError("--batch_size must be >= 1")
  if inference_chunk < 0:
    raise ValueError("--inference_chunk must be >= 0 (0: the whole batch)")
  check_can_create(out_dir)
  planned = plan(direction, inputs, os.path.abspath(out_dir), save)  # inputs walked once
  loaded = inference.load(checkpoint, compute_dtype, inference_chunk)
  return _rescale_planned(direction, loaded, planned, out_dir, batch_size, save, workers,
                          progress)
