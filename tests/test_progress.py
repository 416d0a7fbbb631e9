"""Progress output of the long commands (grain_jax/util/progress.py)."""
import io

from grain_jax.util import progress


def test_progress_in_a_log_file_is_one_plain_line_per_interval(monkeypatch):
  """stderr redirected to a file (a batch system's log): no carriage-return refreshes, one
  line per progress.LOG_INTERVAL_S; every refresh a line of its own."""
  log = io.StringIO()
  with progress.progress_bar(1000, "train invrrdb", "step", file=log) as b:
    for _ in range(1000):
      b.update(1)
  lines = log.getvalue().splitlines()
  assert "\r" not in log.getvalue() and 1 <= len(lines) <= 3, lines  # minutes apart
  assert lines[-1].startswith("train invrrdb: 100%") and "1000/1000" in lines[-1]
  monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
  log = io.StringIO()
  with progress.progress_bar(50, "evaluate", "img", file=log) as b:
    for _ in range(50):
      b.update(1)
      b.set_postfix(loss="0.1", refresh=False)
  lines = log.getvalue().splitlines()
  assert "\r" not in log.getvalue() and len(lines) >= 10
  assert all(line.startswith("evaluate:") and len(line) <= 100 for line in lines)
