"""Where images come from: folders of files and prepared TFDS splits, as random-access sources.

A source is random access: `len(src)`, `src.name(i)` (the item's relative file name) and
`src.load(i)` -> (float32 RGB in [0, 1], conversion note or None), raising ImageError for an
unreadable item. TFDS splits are read through `tfds.data_source` (ArrayRecord files), which
needs no TensorFlow install; their encoded images are decoded here, like files, with PIL.
(Preparing a TFDS dataset does need TensorFlow; reading one does not.)
"""
from __future__ import annotations

import functools
import io
import os
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from grain_jax.formats import images


class FolderSource:
  """Image files found in folders and/or given by name (see images.find_images)."""

  def __init__(self, inputs: Iterable[str] | str):
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    self.inputs = inputs
    self.files = images.find_images(inputs)
    images.output_names(self.files)  # raises now if two inputs would share an output name
    self.description = ", ".join(inputs)

  def __len__(self) -> int:
    return len(self.files)

  def name(self, i: int) -> str:
    return self.files[i].name

  def load(self, i: int) -> tuple[np.ndarray, str | None]:
    return images.read_image(self.files[i].path)


class TfdsSource:
  """One split of a prepared TFDS dataset with an 'image' feature, e.g. 'celeb_a_hq/1024:2.0.0'.

  `split` takes TFDS slicing ('test[:100]'). Files are named after a filename feature when
  the dataset has one, else <index>.png.
  """
  NAME_KEYS = ("image/filename", "file_name", "filename", "name", "id")

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    try:
      # Images come as the encoded bytes: a corrupt one then fails in load(), not when the
      # record (and its file name) is read. download=False: reading never starts a download
      # (preparing a dataset needs TensorFlow and is a step of its own).
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises many kinds; all mean "not usable here"
      first = (str(e).strip().splitlines() or [""])[0]  # TFDS appends long lists of names
      raise FileNotFoundError(
          f"tfds:{name}/{split}: cannot open the prepared dataset ({type(e).__name__}: "
          f"{first}); prepare it first (tfds build --file_format=array_record, which needs "
          f"TensorFlow) and pass --data_dir if it is not in ~/tensorflow_datasets") from None
    features = self.ds.dataset_info.features
    if "image" not in features:
      raise ValueError(f"tfds:{name}: no 'image' feature (has {sorted(features.keys())})")
    self.name_key = next((k for k in self.NAME_KEYS if k in features), None)
    self.description = f"tfds:{name}/{split}"
    self._width = len(str(max(len(self.ds) - 1, 0)))
    # name(i) and load(i) of one item share one record read.
    self._record = functools.lru_cache(maxsize=256)(lambda i: self.ds[i])

  def __len__(self) -> int:
    return len(self.ds)

  def name(self, i: int) -> str:
    if self.name_key is not None:
      try:
        v = self._record(i)[self.name_key]
        v = v.decode() if isinstance(v, bytes) else str(v)
        return v.replace(os.sep, "_")
      except Exception:  # a corrupt record is reported by load()
        pass
    return f"{i:0{self._width}d}.png"

  def load(self, i: int) -> tuple[np.ndarray, str | None]:
    try:
      with Image.open(io.BytesIO(self._record(i)["image"])) as img:
        img.load()
        return images.decode(img)
    except Exception as e:
      raise images.ImageError(f"{self.description}[{i}] ({self.name(i)}): cannot decode "
                              f"({type(e).__name__}: {e})") from None


class PairedFolders:
  """Source and target folders holding the same relative file names (the original's layout)."""

  def __init__(self, source: str, target: str):
    src = FolderSource(source)
    tgt = {os.path.splitext(f.name)[0]: f for f in FolderSource(target).files}
    self.pairs = [(f, tgt[os.path.splitext(f.name)[0]]) for f in src.files
                  if os.path.splitext(f.name)[0] in tgt]
    if not self.pairs:
      raise ValueError(f"no file of {source} has a namesake in {target}")
    self.description = f"{source} -> {target}"

  def __len__(self):
    return len(self.pairs)

  def name(self, i):
    return self.pairs[i][0].name

  def load_pair(self, i):
    s, t = self.pairs[i]
    return images.read_image(s.path)[0], images.read_image(t.path)[0]


def open_source(spec: str, data_dir: str | None = None):
  """'tfds:NAME/SPLIT' -> TfdsSource; anything else is a folder or file -> FolderSource."""
  if spec.startswith("tfds:"):
    body = spec[len("tfds:"):]
    if "/" not in body:
      raise ValueError(f"{spec}: expected tfds:NAME/SPLIT, e.g. tfds:celeb_a_hq/1024/test")
    name, split = body.rsplit("/", 1)
    return TfdsSource(name, split, data_dir)
  return FolderSource(spec)
