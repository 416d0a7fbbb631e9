"""Image files in and out: finding inputs, decoding any common format to RGB, square resizing.

Pixel conventions: files are decoded to float32 RGB in [0, 1] (HxWx3); the networks take
[-1, 1]; images written back are 8-bit RGB PNGs, rounded to the nearest level. (The original's
`tensor2im` truncates instead, which darkens its saved images by half a level on average.)
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(ValueError):
  """A file that is not a readable image, or an image of the wrong size."""


class InputFile(NamedTuple):
  path: str     # the file to read
  name: str     # its path relative to the input folder (or its base name), for outputs


def find_images(inputs: Iterable[str]) -> list[InputFile]:
  """Files and folders -> image files (folders searched recursively, sorted).

  A file given by name is kept whatever its extension (it is reported if it cannot be read);
  inside folders only files with an image extension are taken. A missing input raises.
  """
  found = []
  for item in inputs:
    if os.path.isdir(item):
      for root, dirs, files in os.walk(item):
        dirs.sort()
        for f in sorted(files):
          if f.lower().endswith(EXTENSIONS) and not f.startswith("."):
            path = os.path.join(root, f)
            found.append(InputFile(path, os.path.relpath(path, item)))
    elif os.path.isfile(item):
      found.append(InputFile(item, os.path.basename(item)))
    else:
      raise FileNotFoundError(f"{item}: no such file or folder")
  return found


def collect_inputs(inputs: list[str]) -> tuple[list, list[str]]:
  """(the image files of the files and folders `inputs`, the inputs that do not exist);
  raises ValueError when there is no image at all (a wrong folder, not a success)."""
  found, missing = [], []
  for item in inputs:
    if os.path.exists(item):
      found += find_images([item])
    else:
      missing.append(item)
  if not found:
    raise ValueError(f"no images in {', '.join(inputs)}"
                     + (f" ({', '.join(missing)}: no such file or folder)" if missing else ""))
  return found, missing


def output_names(files: list[InputFile], suffix: str = ".png") -> list[str]:
  """Output names (input name with its extension replaced); raises if two would collide."""
  names, seen = [], {}
  for f in files:
    out = os.path.splitext(f.name)[0] + suffix
    if out in seen:
      raise ValueError(f"{seen[out]} and {f.path} would both be written as {out}; "
                       f"rename one or process them separately")
    seen[out] = f.path
    names.append(out)
  return names


def decode(img: Image.Image) -> tuple[np.ndarray, str | None]:
  """A PIL image -> (float32 RGB in [0, 1], note on any conversion made or None).

  Grayscale is repeated to RGB; transparency is composited onto white; palette, CMYK etc.
  go through PIL's RGB conversion; 16-bit grayscale keeps its precision (Pillow itself
  reduces 16-bit RGB PNGs to 8 bits when it reads them).
  """
  img = ImageOps.exif_transpose(img)
  mode, note = img.mode, None
  if mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(img).astype(np.float32)
    a = a / (65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0)
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, -1), f"{mode} (16-bit grayscale) -> RGB"
  if mode == "F":
    a = np.clip(np.asarray(img, np.float32), 0, 1)
    return np.repeat(a[..., None], 3, -1), "32-bit float grayscale (taken as [0, 1]) -> RGB"
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
    rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
    alpha = rgba[..., 3:]
    note = f"{mode} -> RGB (transparency composited onto white)"
    return rgba[..., :3] * alpha + (1.0 - alpha), note
  if img.mode != "RGB":
    note = f"{mode} -> RGB"
    img = img.convert("RGB")
  return np.asarray(img, np.float32) / 255.0, note


def decode_array(a: np.ndarray) -> tuple[np.ndarray, str | None]:
  """A uint8 array (HxW, HxWx3 or HxWx4) -> float32 RGB in [0, 1], like a decoded file."""
  return decode(Image.fromarray(np.asarray(a, np.uint8)))


def read_image(path: str) -> tuple[np.ndarray, str | None]:
  """Decodes an image file to float32 RGB in [0, 1]; raises ImageError naming the file."""
  try:
    with Image.open(path) as img:
      img.load()
      return decode(img)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
  """Center-crops to a square (the shorter side) and resizes to size x size.

  Resizing is PIL's antialiased bicubic on float data, so nothing is quantized on the way.
  Images already of that size are returned unchanged.
  """
  h, w = img.shape[:2]
  if (h, w) == (size, size):
    return img
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  if s == size:
    return np.ascontiguousarray(img)
  return resize_to(img, size, size)


def resize_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """Antialiased bicubic resize (PIL, on float data) of an HxWxC float image in [0, 1]."""
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32), mode="F")
                      .resize((width, height), Image.BICUBIC)) for c in range(img.shape[-1])]
  return np.clip(np.stack(chans, -1), 0.0, 1.0).astype(np.float32)


def to_model(img01: np.ndarray) -> np.ndarray:
  """[0, 1] -> the networks' [-1, 1]."""
  return np.asarray(img01, np.float32) * 2.0 - 1.0


def png_levels(x):
  """[-1, 1] floats -> the 8-bit levels a saved PNG holds (rounded to the nearest, clipped),
  as floats in [0, 255]; numpy or JAX arrays alike (evaluation computes them in its jitted
  step)."""
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.clip(xp.floor((x + 1.0) * 127.5 + 0.5), 0.0, 255.0)


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8 (png_levels)."""
  return png_levels(np.asarray(x, np.float32)).astype(np.uint8)


def write_png(path: str, u8: np.ndarray) -> None:
  """Writes an HxWx3 uint8 array as PNG, creating folders as needed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(u8, np.uint8)).save(path, format="PNG")
