"""Reading ahead in background threads, grouped into batches, with failures reported by name.

Evaluation and `grain-jax down|up` read, decode and resize files in threads while the device
computes (`prefetch`), take them in fixed-size batches (`batches`, `pad_batch`: programs are
compiled for one batch shape) and report an unreadable file without stopping (`Report`).
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable, Iterable, Iterator

import numpy as np


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
