"""Stopping a training run cleanly: on a signal or at a time limit, after the current step,
with a checkpoint of that step, so that the same command resumes it.

Cloud TPU spot VMs and Kubernetes evictions send SIGTERM with seconds of grace, SLURM sends
SIGTERM (or `--signal`'s choice) before its time limit, and people press Ctrl-C. `Requests`
turns SIGTERM, SIGINT and `cfg.stop_signal` (e.g. 'SIGUSR1') into a request the training
loop reads after each step; a second SIGINT stops at once (KeyboardInterrupt).
`cfg.time_limit_s` requests a stop once that many seconds have passed since the run started.
In a multi-process job every process must stop at the same step (they checkpoint together):
the processes compare their requests every `cfg.stop_check_every` steps, one small
collective, and stop as soon as any process has one.
"""
from __future__ import annotations

import logging
import signal
import threading

import numpy as np
from jax.experimental import multihost_utils

from grain_jax.util import distributed

log = logging.getLogger("grain_jax.train")

TIME_LIMIT = 1000  # time_limit_s among signal numbers, when processes compare requests
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint; run the same command again


class Interrupted(Exception):
  """The run stopped at a signal or its time limit, after saving a checkpoint."""

  def __init__(self, step: int, reason: str, workdir: str):
    super().__init__(f"stopped at step {step} ({reason}) with a checkpoint of that step in "
                     f"{workdir}; run the same command again to resume")
    self.step, self.reason = step, reason


class Requests:
  """Stop requests of one run: `install` the signal handlers, read `due` after each step,
  `restore` the previous handlers. `clock` is the run's clock (util.runs.clock) and
  `started` the run's start on it."""

  def __init__(self, cfg, started: float, clock):
    self.reason: str | None = None
    self.clock = clock
    self.deadline = started + float(cfg.time_limit_s) if cfg.time_limit_s > 0 else None
    self.every = max(1, int(cfg.stop_check_every))
    names = ["SIGTERM", "SIGINT"] + ([cfg.stop_signal] if cfg.stop_signal else [])
    unknown = [n for n in names if not hasattr(signal, n)]
    if unknown:
      raise ValueError(f"stop_signal {cfg.stop_signal!r} is not a signal of this system")
    self.signals = [getattr(signal, n) for n in dict.fromkeys(names)]
    self._previous = {}

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():  # where Python takes signals
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.reason and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: at once, without a checkpoint
    if not self.reason:
      self.reason = name
      log.warning("%s received: the run stops after this step, with a checkpoint%s", name,
                  " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")

  def due(self, step: int) -> str | None:
    """Why the run stops after `step` (the same on every process), or None."""
    if self.reason is None and self.deadline is not None and self.clock() >= self.deadline:
      self.reason = "time_limit_s"
    if not distributed.multiprocess():
      return self.reason
    if step % self.every:
      return None
    # Each process's request as a number (a signal's, or TIME_LIMIT), so that every process
    # names the same one: the first process's that has one.
    code = (0 if self.reason is None else TIME_LIMIT if self.reason == "time_limit_s"
            else signal.Signals[self.reason].value)
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
    if not codes.any():
      return None
    first = int(np.flatnonzero(codes)[0])
    why = ("time_limit_s" if codes[first] == TIME_LIMIT
           else signal.Signals(int(codes[first])).name)
    return f"{why} on process {first}"
