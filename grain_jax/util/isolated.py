"""Running one function in a child Python process under a host-memory and time limit,
with its peak resident memory measured.

For work that may exhaust the host (an ahead-of-time TPU compile of a large program can take
more than 24 GB): the child is stopped at the limit, the caller learns how far it got, and
nothing else on the host is killed by the kernel's out-of-memory killer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

# The child: imports `module`, calls `function(**kwargs)`, writes its JSON-able result and,
# however it ends, its peak resident memory (VmHWM, KiB; not wait4's ru_maxrss, which also
# counts this forking process's memory, handed on at exec).
_CHILD = """
import importlib, json, sys
spec = json.load(open(sys.argv[1]))
try:
  fn = getattr(importlib.import_module(spec["module"]), spec["function"])
  result = fn(**spec["kwargs"])
  with open(sys.argv[2], "w") as f:
    json.dump(result, f)
finally:
  with open("/proc/self/status") as f, open(sys.argv[3], "w") as out:
    out.write("".join(l.split()[1] for l in f if l.startswith("VmHWM:")))
"""

POLL_S = 0.2


@dataclasses.dataclass
class Outcome:
  status: str                 # "ok", "error" (it raised), "memory" (stopped at the limit),
                              # "timeout" (stopped at the time limit), "killed" (by a signal)
  result: object = None       # the function's return value (status "ok")
  seconds: float = 0.0
  peak_rss_gb: float | None = None   # the child's peak resident memory, GiB
  error: str = ""             # the end of its stderr (status != "ok")


def _status_kib(pid: int) -> dict:
  """VmRSS and VmHWM (its peak) of a running process, KiB; {} where /proc has none."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
              if k in ("VmRSS", "VmHWM")}
  except (OSError, ValueError):
    return {}


def run(module: str, function: str, kwargs: dict, memory_limit_gb: float | None = None,
        timeout_s: float | None = None, env: dict | None = None) -> Outcome:
  """Calls module.function(**kwargs) (JSON-able in and out) in a fresh Python process.

  memory_limit_gb: stop it once its resident memory passes this; timeout_s: once it has run
  this long; env: extra environment variables for it.
  """
  with tempfile.TemporaryDirectory(prefix="grain_jax_child_") as tmp:
    spec, out, err, peak_file = (os.path.join(tmp, n)
                                 for n in ("spec.json", "out.json", "stderr", "peak"))
    with open(spec, "w") as f:
      json.dump(dict(module=module, function=function, kwargs=kwargs), f)
    t = time.perf_counter()
    with open(err, "w") as err_f:
      child = subprocess.Popen([sys.executable, "-c", _CHILD, spec, out, peak_file],
                               stdout=subprocess.DEVNULL, stderr=err_f,
                               env={**os.environ, **(env or {})})
    peak_kib, stopped, code = 0, "", None
    try:
      while code is None:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
          code = os.waitstatus_to_exitcode(status)
          break
        kib = _status_kib(child.pid)
        peak_kib = max(peak_kib, kib.get("VmHWM", 0))
        if memory_limit_gb and kib.get("VmRSS", 0) > memory_limit_gb * 2 ** 20:
          stopped = "memory"
        elif timeout_s and time.perf_counter() - t > timeout_s:
          stopped = "timeout"
        if stopped:
          child.send_signal(signal.SIGKILL)
          os.waitpid(child.pid, 0)
          break
        time.sleep(POLL_S)
    except BaseException:  # e.g. Ctrl-C: the child goes too
      child.kill()
      child.wait()
      raise
    child.returncode = code if code is not None else -signal.SIGKILL  # reaped here
    seconds = time.perf_counter() - t
    try:  # the child's own figure where it got to write it, else the last one polled
      with open(peak_file) as f:
        peak_kib = max(peak_kib, int(f.read()))
    except (OSError, ValueError):
      pass
    peak = peak_kib / 2 ** 20 if peak_kib else None
    if stopped:
      return Outcome(stopped, seconds=seconds, peak_rss_gb=peak, error=_tail(err))
    if code != 0 or not os.path.exists(out):
      status = "killed" if code < 0 else "error"
      return Outcome(status, seconds=seconds, peak_rss_gb=peak, error=_tail(err))
    with open(out) as f:
      return Outcome("ok", json.load(f), seconds, peak)


def _tail(path: str, lines: int = 20) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:]).strip()
