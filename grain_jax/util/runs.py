"""What every run shares: one run at a time per workdir, and the clock its time budgets and
limits count on.

`locked(workdir, what)` holds WORKDIR/.lock (a `WorkdirLock`) while a run writes there, on
every process of a job; `clock()` is the monotonic clock a run's budget, time limit and the
pipeline's shares are measured with (one function, so tests can drive it).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time

import jax

from grain_jax.util import distributed


def clock() -> float:
  """The clock of time budgets and time limits (a function, so tests can drive it)."""
  return time.monotonic()


class WorkdirLock:
  """An exclusive lock on a folder (its file `.lock`), held while a run writes there.

  It is an advisory fcntl lock on an open file: the kernel releases it when the holder ends,
  however it ends, so a killed run never blocks the next one. The file names the holder
  (host, pid, start time) for the message a second run gets.
  """

  NAME = ".lock"

  def __init__(self, directory: str, what: str = "run"):
    self.path = os.path.join(os.path.abspath(directory), self.NAME)
    self.what = what
    self._f = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      try:
        holder = json.loads(f.read() or "{}")
      except json.JSONDecodeError:
        holder = {}
      f.close()
      who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "since") if k in holder)
      raise RuntimeError(f"{os.path.dirname(self.path)} is in use by another {self.what}"
                         f"{f' ({who})' if who else ''}; wait for it to end or choose "
                         f"another folder") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    self._f = f
    return self

  def release(self) -> None:
    if self._f is not None:
      self._f.close()  # closing drops the flock
      self._f = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def locked(workdir: str, what: str):
  """Holds the workdir's lock while a run writes there; refused, on every process, if
  another run holds it. One writer per workdir: the first process (the others of a
  multi-host run write only their checkpoint shards and data positions, which Orbax
  coordinates). The workdir must be one folder that every process sees."""
  distributed.check_shared_folder(workdir)
  lock, refused = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, what).acquire()
    except RuntimeError as e:
      refused = e
  if refused and not distributed.multiprocess():
    raise refused
  distributed.agree(refused is None, str(refused or f"{workdir} is in use by another run"))
  try:
    yield
  finally:
    if lock:
      lock.release()
