"""Writing results without losing anything: atomic files, writable-folder checks, temp folders.

Every result file (metrics.json, per_image.csv, score.json, config.json, the weights
directories) is written to a temporary name beside its target and renamed over it, so a
killed run leaves either the old file or the new one, never half of one. Temporary folders
carry the writer's host and pid in their name, so a later run can remove the ones whose
writer is gone (and only those).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from typing import Iterator


def umask() -> int:
  """The process umask (read without changing it for longer than the call)."""
  mask = os.umask(0o22)
  os.umask(mask)
  return mask


def user_mode(directory: bool = True) -> int:
  """The mode a folder (0o777) or file (0o666) created by the user would get."""
  return (0o777 if directory else 0o666) & ~umask()


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator:
  """Opens a temporary file beside `path`; on success it replaces `path` (os.replace)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, user_mode(directory=False))  # mkstemp makes 0600
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, obj, **kwargs) -> None:
  """json.dump(obj) to `path` atomically (NaN and infinity refused: JSON has none)."""
  kwargs.setdefault("indent", 1)
  with atomic_open(path) as f:
    json.dump(obj, f, allow_nan=False, **kwargs)


def check_writable(directory: str, what: str = "output folder") -> str:
  """check_can_create, then creates `directory`: proves before any work that results can be
  written there; raises naming it otherwise. Returns the absolute path."""
  directory = check_can_create(directory, what)
  os.makedirs(directory, exist_ok=True)
  return directory


def check_can_create(directory: str, what: str = "output folder") -> str:
  """Creates nothing: `directory` must be a writable folder, or be
  creatable in its nearest existing parent (a writable folder). A command that then fails
  for another reason leaves no empty folder behind. Returns the absolute path."""
  directory = os.path.abspath(directory)
  probe = directory
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    where = "is a file" if probe == directory else f"cannot be made: {probe} is a file"
    raise NotADirectoryError(f"{what} {directory} {where}, not a folder")
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    where = "" if probe == directory else f" (cannot be made in {probe})"
    raise PermissionError(f"{what} {directory} is not writable{where} "
                          f"({e.strerror or e})") from None
  return directory


def _owner_tag() -> str:
  return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def make_temp_dir(parent: str, prefix: str) -> str:
  """A new folder `parent/PREFIXHOST-PID-XXXX` (see remove_stale_temp_dirs)."""
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f"{prefix}{_owner_tag()}-", dir=parent)


def stale_temp_dirs(parent: str, prefix: str) -> list[str]:
  """Folders made by make_temp_dir(parent, prefix) whose process (on this host) has ended,
  e.g. by a kill mid-write. Other hosts' and live processes' folders are not listed."""
  if not os.path.isdir(parent):
    return []
  host, stale = socket.gethostname(), []
  for name in sorted(os.listdir(parent)):
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    if not rest.startswith(host + "-"):
      continue
    pid = rest[len(host) + 1:].split("-", 1)[0]
    if pid.isdigit() and not _alive(int(pid)):
      stale.append(os.path.join(parent, name))
  return stale


def remove_stale_temp_dirs(parent: str, prefix: str) -> list[str]:
  """Removes the stale_temp_dirs(parent, prefix); returns their names."""
  removed = []
  for path in stale_temp_dirs(parent, prefix):
    shutil.rmtree(path, ignore_errors=True)
    removed.append(os.path.basename(path))
  return removed


def inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies inside it (symlinks resolved)."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
