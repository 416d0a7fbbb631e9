"""Image sources (folders of files, TFDS splits) and background-thread prefetching.

A source is random access: `len(src)`, `src.name(i)` (the item's relative file name) and
`src.load(i)` -> (float32 RGB in [0, 1], conversion note or None), raising ImageError for an
unreadable item. TFDS splits are read through `tfds.data_source` (ArrayRecord files), which
needs no TensorFlow install; their encoded images are decoded here, like files, with PIL.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from grain_jax import images


class FolderSource:
  """Image files found in folders and/or given by name (see images.find_images)."""

  def __init__(self, inputs: Iterable[str] | str):
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
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
    import tensorflow_datasets as tfds

    try:
      # Images come as the encoded bytes: a corrupt one then fails in load(), not when the
      # record (and its file name) is read.
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises many kinds; all mean "not usable here"
      raise FileNotFoundError(
          f"tfds:{name}/{split}: cannot open the prepared dataset ({type(e).__name__}: {e}); "
          f"prepare it first (tfds build / download_and_prepare with file_format="
          f"array_record) and pass --data_dir if it is not in ~/tensorflow_datasets") from None
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


class Report:
  """Collects failed inputs (each printed) and conversions (each kind printed once)."""

  def __init__(self, write):
    self.write, self.failed, self.counts = write, [], collections.Counter()

  def fail(self, name: str, err) -> None:
    self.failed.append({"file": name, "error": str(err)})
    self.write(f"skipped {name}: {err}")

  def note(self, name: str, note: str | None) -> None:
    """A format conversion (e.g. 'L -> RGB'), printed the first time it happens."""
    if note:
      if not self.counts[note]:
        self.write(f"note: {name}: {note} (and likewise for similar files)")
      self.counts[note] += 1

  def resized(self, name: str, shape, size: int) -> None:
    if not self.counts["resized"]:
      self.write(f"note: {name} is {shape[1]}x{shape[0]}: inputs that are not {size}x{size} "
                 f"are center-cropped to a square and resized (antialiased bicubic)")
    self.counts["resized"] += 1


def open_source(spec: str, data_dir: str | None = None):
  """'tfds:NAME/SPLIT' -> TfdsSource; anything else is a folder or file -> FolderSource."""
  if spec.startswith("tfds:"):
    body = spec[len("tfds:"):]
    if "/" not in body:
      raise ValueError(f"{spec}: expected tfds:NAME/SPLIT, e.g. tfds:celeb_a_hq/1024/test")
    name, split = body.rsplit("/", 1)
    return TfdsSource(name, split, data_dir)
  return FolderSource(spec)


def prefetch(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 4,
             depth: int = 16) -> Iterator[tuple[Any, Any, BaseException | None]]:
  """Yields (item, fn(item), None) in order, computed by `workers` background threads.

  At most `depth` results are pending at a time. An exception raised by fn for one item is
  yielded as (item, None, exc) instead of stopping the stream, so one bad file loses nothing
  else.
  """
  def safe(item):
    try:
      return fn(item), None
    except Exception as e:  # handed to the consumer, which reports it
      return None, e

  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(safe, item)))
      if len(pending) >= depth:
        break
    while pending:
      item, fut = pending.popleft()
      nxt = next(items, _END)
      if nxt is not _END:
        pending.append((nxt, pool.submit(safe, nxt)))
      yield (item, *fut.result())


_END = object()


def batches(stream: Iterable[tuple[Any, Any, BaseException | None]], batch_size: int,
            on_error: Callable[[Any, BaseException], None]) -> Iterator[list[tuple[Any, Any]]]:
  """Groups a `prefetch` stream into lists of `batch_size` (item, result) pairs, in order; the
  last list may be shorter. A failed item goes to on_error(item, exc) and is left out."""
  batch = []
  for item, res, err in stream:
    if err is not None:
      on_error(item, err)
      continue
    batch.append((item, res))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def pad_batch(arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
  """Stacks `arrays` and appends zero rows up to `batch_size` (programs are compiled for one
  batch shape; the padding's results are dropped by the caller)."""
  x = np.stack(arrays)
  if len(arrays) < batch_size:
    x = np.concatenate([x, np.zeros((batch_size - len(arrays),) + x.shape[1:], x.dtype)])
  return x
