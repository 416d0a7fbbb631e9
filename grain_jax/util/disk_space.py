"""Running out of disk space: seeing it coming, recognising it, and saying it in one line.

A training run writes a checkpoint and a weights export every `checkpoint_every` steps for
days. Before each, Checkpoints.save compares the free space with the size of what it is about
to write (`folder_bytes` of the last checkpoint and export); a write that fails anyway for
lack of space raises somewhere in Orbax or TensorStore, in a background thread, as an OSError
(ENOSPC) or a ValueError carrying 'RESOURCE_EXHAUSTED ... No space left on device'.
`is_disk_full` recognises both (orbax_log_filter drops the tracebacks Orbax and asyncio log for
the same failure, so the run's one DiskFullError line is the last word).
"""
from __future__ import annotations

import errno
import os
import shutil

# How Python (strerror), TensorStore (os_error_code) and Orbax name ENOSPC in messages.
_MARKS = ("No space left on device", "os_error_code='28'", "[Errno 28]")


class DiskFullError(OSError):
  """A write that failed, or was not started, for lack of disk space."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


def is_disk_full(e: BaseException | None) -> bool:
  """Whether `e`, or an exception it was raised from or while handling, is a full disk."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if mentions_disk_full(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def mentions_disk_full(text: str) -> bool:
  """Whether an error message says ENOSPC, in Python's, TensorStore's or Orbax's words."""
  return any(m in text for m in _MARKS)


def free_bytes(path: str) -> int:
  """Free space for this user on the filesystem holding `path` (its nearest existing
  folder)."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def folder_bytes(path: str) -> int:
  """The size of the files under `path` (0 when it does not exist)."""
  total = 0
  for root, _, names in os.walk(path):
    for n in names:
      try:
        total += os.lstat(os.path.join(root, n)).st_size
      except OSError:  # removed meanwhile
        pass
  return total


def mb(n: float) -> str:
  """`n` bytes in MB, for messages."""
  return f"{n / 2**20:,.1f} MB"
