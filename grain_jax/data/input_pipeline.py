"""Training batches: folders (optionally paired source/target) or TFDS splits -> NHWC batches.

Built on the `grain` data library: a deterministic shuffle from the seed, different in each
epoch; each host takes its slice of every global batch; decoding and cropping run in
background threads; the iterator's position (`get_state`/`set_state`, a small JSON dict) is
saved with each checkpoint so a resumed run sees exactly the batches it would have seen.
Unreadable examples are skipped, counted (`skipped()`) and named in the log (the first few);
but a source with no example, or whose first examples all fail to read, stops the run at
once (DataError) instead of leaving it spinning on an endless stream of failures.
"""
from __future__ import annotations

import logging
import threading

import numpy as np
from grain import MapDataset, ReadOptions  # the data-loading library, not this project

from grain_jax.data import sources
from grain_jax.formats import images

log = logging.getLogger("grain_jax.data")

# A run stops if this many examples (or every example of a smaller source) failed to read
# before any succeeded; unreadable files are named up to NAMED_SKIPS of them, then counted.
MAX_FAILURES_BEFORE_FIRST = 100
NAMED_SKIPS = 5


class DataError(ValueError):
  """Training data that cannot serve a single example."""


class _Unpaired:
  def __init__(self, source):
    self.source = source
    self.description = getattr(source, "description", "")

  def __len__(self):
    return len(self.source)

  def name(self, i):
    return self.source.name(i)

  def load_pair(self, i):
    return self.source.load(i)[0], None  # the target is the input


def open_training_source(cfg_data):
  """The config's training data as an object with len() and load_pair(i) -> (x01, y01)."""
  data_dir = cfg_data.data_dir or None
  if cfg_data.train_target:
    return sources.PairedFolders(cfg_data.train, cfg_data.train_target)
  if not cfg_data.train:
    raise ValueError("no training data: set --config.data.train=FOLDER or tfds:NAME/SPLIT")
  source = _Unpaired(sources.open_source(cfg_data.train, data_dir))
  if len(source) == 0:
    raise DataError(f"no training images in {cfg_data.train} (looked for "
                    f"{', '.join(images.EXTENSIONS)} files, in subfolders too)")
  return source


def crop_pair(x: np.ndarray, y: np.ndarray | None, size: int, cfg_data,
              rng: np.random.Generator):
  """The same crop (and flip) of source and target, as size x size float32 in [-1, 1].

  'center': the center square resized to size. 'random': a random square of side
  size / scale (scale drawn from data.random_scale, at most the shorter side) resized to
  size, i.e. a random crop of the picture scaled by `scale`. y=None: the target is x.
  """
  if cfg_data.crop == "center":
    crops = [images.resize_square(a, size) for a in (x, y) if a is not None]
  elif cfg_data.crop == "random":
    lo, hi = cfg_data.random_scale
    h, w = x.shape[:2]
    side = min(h, w, max(1, int(round(size / rng.uniform(lo, hi)))))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crops = [images.resize_square(a[top:top + side, left:left + side], size)
             for a in (x, y) if a is not None]
  else:
    raise ValueError(f"data.crop must be 'center' or 'random', got {cfg_data.crop!r}")
  if cfg_data.hflip and rng.random() < 0.5:
    crops = [c[:, ::-1] for c in crops]
  crops = [images.to_model(c) for c in crops]
  return crops[0], crops[-1]


class _HostShare(MapDataset):
  """Host `index`'s part of each global batch of `count * per_host` consecutive elements:
  elements [index * per_host, (index + 1) * per_host) of it. Assembled in process order (as
  jax.make_array_from_process_local_data does on a mesh of jax.devices()), the hosts' batches
  form the global batch a single process would read. Only this host's elements are loaded."""

  def __init__(self, parent: MapDataset, index: int, count: int, per_host: int):
    super().__init__(parent)
    self._index, self._count, self._per_host = index, count, per_host

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    batch, j = divmod(k, self._per_host)
    return self._parent[(batch * self._count + self._index) * self._per_host + j]

  def __str__(self) -> str:
    return f"_HostShare(index={self._index}, count={self._count}, per_host={self._per_host})"


class TrainData:
  """An endless, resumable iterator of dict(x, y) batches for this host."""

  def __init__(self, cfg_data, hr_size: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.source = open_training_source(cfg_data)
    self._skipped, self._served, self._named = 0, 0, set()
    self._lock = threading.Lock()
    # Each host reads every process_count-th example of the (repeated) shuffle.
    per_host = -(-len(self.source) // process_count)
    give_up = min(MAX_FAILURES_BEFORE_FIRST, per_host)
    where = getattr(self.source, "description", "") or cfg_data.train

    def load(i, rng):
      try:
        x, y = self.source.load_pair(int(i))
        x, y = crop_pair(x, y, hr_size, cfg_data, rng)
      except (images.ImageError, OSError, ValueError) as e:
        name = self._name(int(i))
        with self._lock:
          self._skipped += 1
          skipped, served = self._skipped, self._served
          new = name not in self._named and len(self._named) < NAMED_SKIPS
          if new:
            self._named.add(name)
          last = len(self._named) == NAMED_SKIPS
        if new:  # each file once (every epoch tries it again), the first few only
          log.warning("skipped training example %s: %s%s", name, e,
                      " (further unreadable files are only counted)" if last else "")
        if not served and skipped >= give_up:
          raise DataError(f"{where}: none of the first {skipped} training examples could be "
                          f"read (last: {e})") from None
        return None
      with self._lock:
        self._served += 1
      return {"x": x, "y": y}

    ds = MapDataset.range(len(self.source)).shuffle(seed=seed).repeat()
    # Crops and flips are drawn from the example's global position, then each host takes
    # its part of every global batch: N hosts read exactly the batches one process reads.
    ds = ds.random_map(load, seed=seed + 1)
    ds = _HostShare(ds, process_index, process_count, batch_size)
    it_ds = ds.to_iter_dataset(ReadOptions(num_threads=max(1, int(cfg_data.workers)),
                                                 prefetch_buffer_size=4 * batch_size + 8))
    it_ds = it_ds.filter(lambda ex: ex is not None).batch(batch_size, drop_remainder=True)
    self._it = iter(it_ds)

  def _name(self, i: int) -> str:
    try:
      return self.source.name(i)
    except Exception:  # a name that cannot be read is not worth a second failure
      return f"#{i}"

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  @property
  def iterator(self):
    """The grain iterator (what grain.checkpoint saves: one position file per host)."""
    return self._it

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def skipped(self) -> int:
    """Examples skipped so far because they could not be read."""
    return self._skipped
