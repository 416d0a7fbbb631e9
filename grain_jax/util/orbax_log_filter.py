"""Keeping a failed Orbax read or write to the one line of its error.

When an Orbax restore or save fails part-way (a damaged checkpoint, a full disk), the error
reaches the caller once, but Orbax and TensorStore keep reporting it: Orbax's background
threads log a traceback each ('absl' logger), Orbax closes its event loop while TensorStore
still completes the other reads or writes, whose callbacks then fail on the closed loop
('Event loop is closed', through sys.unraisablehook), and every abandoned asyncio future or
task logs '... exception was never retrieved' with the whole TensorStore spec. A full disk
left ~600 tracebacks after the error line. The filters here drop those kinds only; anything
else passes to the previous hook or handler. Each is installed once, for the process.
"""
from __future__ import annotations

import logging
import os
import sys

from grain_jax.util import disk_space

_installed: set[str] = set()


def silence_failed_read() -> None:
  """Drops what follows a failed restore: callbacks on the closed event loop, Orbax's
  discarded read coroutines, and asyncio's 'never retrieved' records of Orbax reads."""
  if "read" in _installed:
    return
  previous = sys.unraisablehook

  def orbax_coroutine(obj) -> bool:
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename

  def hook(unraisable):
    e = unraisable.exc_value
    if ((isinstance(e, RuntimeError) and str(e) == "Event loop is closed")
        or orbax_coroutine(unraisable.object)):
      return
    previous(unraisable)

  sys.unraisablehook = hook

  def orbax_read(message: str) -> bool:
    return "exception was never retrieved" in message and any(
        k in message for k in ("TensorStore", "OCDBT", f"{os.sep}orbax{os.sep}"))

  logging.getLogger("asyncio").addFilter(lambda r: not orbax_read(r.getMessage()))
  _installed.add("read")


def silence_failed_write() -> None:
  """Drops what follows a write that failed for lack of space: the records of Orbax's
  threads ('absl') and of asyncio that are about that failure, and the same closed-loop
  callbacks as a failed read."""
  silence_failed_read()
  if "write" in _installed:
    return

  def not_disk_full(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    try:
      text = record.getMessage()
    except Exception:  # a record that cannot format is not ours to judge
      return True
    return not (disk_space.is_disk_full(exc) or disk_space.mentions_disk_full(text))

  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(not_disk_full)
  _installed.add("write")
