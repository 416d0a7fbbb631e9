"""Progress bars for the long commands: tqdm's bar on a terminal; in a file (a batch
system's log, stderr redirected), one plain line per LOG_INTERVAL_S instead of a
carriage-return refresh several times a second, so a day-long run's log stays small.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 60.0


class _Lines:
  """A file for tqdm that turns each refresh ('\\r' + the bar) into a line of its own."""

  def __init__(self, f):
    self.f = f

  def write(self, s: str) -> None:
    text = s.replace("\r", "").rstrip()
    if text:
      self.f.write(text + "\n")

  def flush(self) -> None:
    self.f.flush()


def _is_terminal(f) -> bool:
  try:
    return f.isatty()
  except (AttributeError, ValueError):
    return False


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 file=None):
  """A tqdm progress bar on `file` (default stderr); plain lines when it is not a terminal."""
  f = sys.stderr if file is None else file
  if _is_terminal(f):
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                file=f, dynamic_ncols=True)
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
              file=_Lines(f), ascii=True, ncols=100, mininterval=LOG_INTERVAL_S,
              maxinterval=LOG_INTERVAL_S)
