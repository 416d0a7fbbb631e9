"""Reading PyTorch checkpoints safely and mapping their tensors onto Flax parameter trees.

A checkpoint is untrusted input: `.pt` files are pickles, so they are opened with
`torch.load(weights_only=True)`, which refuses to run arbitrary pickled code (only tensors,
plain containers and a short allow-list of harmless classes are accepted).

Each network module has a `from_torch(reader, module)` that builds its Flax variables with a
`TorchReader`; the reader records which keys were used, which were missing, and which were
never read, so a bad file is reported in full, by key, before anything is written
(registry.py checks the result against the configured model with `check_tree`).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util


class CheckpointError(ValueError):
  """A checkpoint file that cannot be used: unreadable, wrong layout, wrong shapes."""


def load_torch_file(path: str) -> Any:
  """Loads a PyTorch `.pt`/`.pth` file without executing pickled code.

  Tensors come back as numpy arrays (float32 unless stored otherwise), nested in the
  file's own dicts/lists. `argparse.Namespace` (rosinality training files store their
  `args`) is the one non-container class allowed.
  """
  try:
    import torch  # deferred: the optional [torch] extra; only conversion reads .pt files
  except ImportError:
    raise CheckpointError(f"{path}: reading PyTorch files needs torch; install it with "
                          f"pip install 'grain-jax[torch]'") from None
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt or unsafe files.
    raise CheckpointError(
        f"{path}: not a readable PyTorch checkpoint, or it needs code to unpickle "
        f"(refused for safety): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ) from None
  return _to_numpy(obj)


def _to_numpy(obj: Any) -> Any:
  import torch  # deferred: the [torch] extra (imported by load_torch_file already)

  if isinstance(obj, torch.Tensor):
    return obj.detach().cpu().numpy()
  if isinstance(obj, Mapping):
    return {k: _to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy(v) for v in obj)
  return obj


class TorchReader:
  """Hands out tensors of a PyTorch state dict in Flax layout, and keeps account.

  Missing keys do not raise at once: they are collected (the returned value is None) so
  that `finish()` can report every problem of a file in one message.
  """

  def __init__(self, state_dict: Mapping[str, Any], what: str):
    self.sd = dict(state_dict)
    self.what = what
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.ignored: set[str] = set()
    self.problems: list[str] = []

  def get(self, key: str) -> np.ndarray | None:
    """The tensor stored under `key` (as float32 if it is floating point)."""
    self.used.add(key)
    if key not in self.sd:
      self.missing.append(key)
      return None
    v = np.asarray(self.sd[key])
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v

  def ignore(self, *keys: str) -> None:
    """Marks keys as known but not needed (e.g. BatchNorm's num_batches_tracked)."""
    self.ignored.update(k for k in keys if k in self.sd)

  def ignore_suffix(self, suffix: str) -> None:
    self.ignored.update(k for k in self.sd if k.endswith(suffix))

  def ignore_prefix(self, prefix: str) -> None:
    self.ignored.update(k for k in self.sd if k.startswith(prefix))

  def problem(self, *messages: str) -> None:
    """Problems other than missing or unexpected keys (reported with them)."""
    self.problems.extend(messages)

  def conv(self, key: str, bias: bool = True) -> dict:
    """A torch Conv2d (O, I, kh, kw) as a Flax conv {'kernel': (kh, kw, I, O), 'bias'}."""
    w = self.get(key + ".weight")
    out = {"kernel": None if w is None else np.transpose(w, (2, 3, 1, 0))}
    if bias:
      out["bias"] = self.get(key + ".bias")
    return out

  def dense(self, key: str, bias: bool = True) -> dict:
    """A torch Linear (O, I) as a Flax Dense {'kernel': (I, O), 'bias'}."""
    w = self.get(key + ".weight")
    out = {"kernel": None if w is None else np.transpose(w)}
    if bias:
      out["bias"] = self.get(key + ".bias")
    return out

  def unused(self) -> list[str]:
    return sorted(k for k in self.sd if k not in self.used and k not in self.ignored)


def check_tree(what: str, params: Any, expected: Any, reader: TorchReader | None = None) -> None:
  """Raises CheckpointError naming every missing/unknown key and wrong shape.

  `expected` is the abstract tree of the Flax model (`jax.eval_shape(model.init, ...)`),
  so the file is checked against the model the configuration describes.
  """
  problems = []
  if reader is not None:
    if reader.missing:
      problems.append(f"missing keys ({len(reader.missing)}): " + ", ".join(reader.missing[:20])
                      + (" ..." if len(reader.missing) > 20 else ""))
    unused = reader.unused()
    if unused:
      problems.append(f"unexpected keys ({len(unused)}): "
                      + ", ".join(unused[:20])
                      + (" ..." if len(unused) > 20 else ""))
    problems += reader.problems
  got = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(expected, sep="/")
  for path, spec in want.items():
    if path not in got:
      if reader is None or not reader.missing:
        problems.append(f"no value for parameter {path}")
      continue
    v = got[path]
    if v is None:
      continue  # Already reported as a missing key.
    if tuple(np.shape(v)) != tuple(spec.shape):
      problems.append(f"{path}: shape {tuple(np.shape(v))} (in Flax layout), "
                      f"the configured model needs {tuple(spec.shape)}")
  for path in got:
    if path not in want:
      problems.append(f"parameter {path} is not part of the configured model")
  if problems:
    raise CheckpointError(f"{what}: " + "; ".join(problems))
