"""Training that goes wrong fails clearly and loses nothing: divergence, data that cannot
serve, two runs in one workdir, damaged logs and checkpoints, initial weights that do not
fit. All on the tiny config (32 <-> 4)."""
import gc
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import ROOT, hook_training_step, signal_at
from tiny_config import tiny_training

TINY = os.path.join(ROOT, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
  """Three small natural pictures."""
  d = tmp_path_factory.mktemp("pictures")
  for name in ("astronaut", "coffee", "chelsea"):
    img = Image.fromarray(getattr(skimage.data, name)())
    img.resize((img.width // 6, img.height // 6), Image.BICUBIC).save(d / f"{name}.png")
  return str(d)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  from grain_jax.cli.program import enable_compilation_cache
  enable_compilation_cache()


def _train_cli(capsys, workdir, *overrides):
  """`grain-jax train --config tests/tiny_config.py` in-process: (exit status, stderr lines)."""
  from grain_jax import cli
  rc = cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--noprogress",
                 *overrides])
  return rc, capsys.readouterr().err.strip().splitlines()


def _errors(lines):
  return [line for line in lines if ": error: " in line]


def _log(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _damage(workdir, step):
  """Truncates the biggest array-data file of a checkpoint, as a full disk or a kill mid-copy
  would (the data, not Orbax's JSON metadata, which is sometimes the bigger file)."""
  paths = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_*",
                                 "d", "*"))
  big = max(paths, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def test_diverging_run_skips_steps_then_stops_with_status_2(pictures, tmp_path, capsys):
  from grain_jax.formats import weights
  held = tmp_path / "held"
  held.mkdir()
  Image.fromarray(skimage.data.astronaut()[100:164, 200:264]).save(held / "a.png")
  work = tmp_path / "w"
  rc, err = _train_cli(capsys, work, f"--config.data.train={pictures}",
                       "--config.learning_rate=1e6", "--config.max_steps=12",
                       "--config.max_nonfinite_steps=3", "--config.checkpoint_every=2",
                       "--config.eval_every=2", f"--config.data.eval={held}")
  assert rc == 2, err
  msg = _errors(err)
  assert len(msg) == 1 and "training diverged at step" in msg[0], err
  assert "not finite for 3 steps in a row" in msg[0] and "last checkpoint is step" in msg[0]
  log = _log(work)
  skipped = [r["step"] for r in log if r["nonfinite"]]
  assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3)), log
  assert all(r["loss"] is None for r in log if r["nonfinite"])  # JSON null, the file parses
  assert log[-1]["nonfinite_total"] == 3
  # What was saved is finite (load_weights refuses NaN), and the run's last checkpoint, named
  # in the message, committed although the run stopped with an error.
  tree, _, meta = weights.load_weights(str(work / "weights"))
  step = int(msg[0].split("last checkpoint is step ")[1].split()[0])
  assert meta["sources"]["trained_steps"] == step
  assert str(step) in os.listdir(work / "checkpoints")
  with open(work / "metrics.json") as f:
    json.load(f)  # validation of the huge weights wrote a whole file


def test_training_data_that_cannot_serve_stops_at_once(tmp_path, capsys, caplog):
  from grain_jax.data.input_pipeline import DataError, TrainData

  empty = tmp_path / "empty"
  empty.mkdir()
  rc, err = _train_cli(capsys, tmp_path / "w1", f"--config.data.train={empty}")
  assert rc == 2 and _errors(err) == [f"grain-jax train: error: no training images in {empty} "
                                      f"(looked for .png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp, "
                                      f".ppm, .pgm files, in subfolders too)"], err

  broken = tmp_path / "broken"
  broken.mkdir()
  for i in range(7):
    (broken / f"bad{i}.png").write_bytes(b"not an image")
  cfg = tiny_training(**{"data.train": str(broken)})
  data = TrainData(cfg.data, 32, 2, seed=0)
  result = {}

  def pull():
    try:
      next(data)
    except Exception as e:
      result["error"] = e

  t = threading.Thread(target=pull, daemon=True)
  with caplog.at_level(logging.WARNING, "grain_jax.data"):
    t.start()
    t.join(60)
  assert not t.is_alive(), "training data that cannot be read made the run hang"
  assert isinstance(result.get("error"), DataError), result
  assert f"{broken}: none of the first 7 training examples could be read" in str(result["error"])
  named = [r.getMessage() for r in caplog.records if "skipped training example" in r.getMessage()]
  assert len(named) == 5 and "further unreadable files are only counted" in named[-1], named
  assert len({m.split()[3] for m in named}) == 5  # five different files, each named once


def test_a_bad_file_among_good_ones_is_named_and_skipped(pictures, tmp_path, caplog):
  import shutil
  from grain_jax.data.input_pipeline import TrainData

  d = tmp_path / "mixed"
  shutil.copytree(pictures, d)
  (d / "broken.png").write_bytes(b"not an image")
  data = TrainData(tiny_training(**{"data.train": str(d)}).data, 32, 2, seed=0)
  with caplog.at_level(logging.WARNING, "grain_jax.data"):
    for _ in range(4):  # two epochs of the 3 good pictures: broken.png was tried
      assert next(data)["x"].shape == (2, 32, 32, 3)
  assert data.skipped() >= 1
  named = [r.getMessage() for r in caplog.records if "skipped training example" in r.getMessage()]
  assert len(named) == 1 and "skipped training example broken.png: " in named[0], named


def test_one_run_per_workdir(tmp_path):
  from grain_jax.train import loop
  from grain_jax.util import runs
  work = tmp_path / "w"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from grain_jax.util import runs; "
       f"lock = runs.WorkdirLock({str(work)!r}).acquire(); print('locked', flush=True); "
       "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match=rf"{work} is in use by another training run \(host "
                                           rf"\S+, pid {holder.pid}, since "):
      loop.train_and_evaluate(tiny_training(), str(work), progress=False)
    assert os.listdir(work) == [".lock"]  # refused before writing anything
  finally:
    holder.send_signal(signal.SIGKILL)  # a killed run: no chance to clean up
    holder.wait()
  with runs.WorkdirLock(str(work)) as lock:  # its lock does not block the next run
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
      runs.WorkdirLock(str(work)).acquire()  # and a lock is a lock within a process too
  runs.WorkdirLock(str(work)).acquire().release()
  assert lock._f is None


def test_resume_survives_a_cut_log_line_and_a_damaged_checkpoint(pictures, tmp_path, caplog,
                                                                  capsys):
  from grain_jax.formats import weights
  from grain_jax.train import loop
  work = str(tmp_path / "w")
  cfg = lambda steps: tiny_training(**{"data.train": pictures, "max_steps": steps})
  loop.train_and_evaluate(cfg(4), work, progress=False)
  first = _log(work)
  with open(os.path.join(work, "train_metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 0.4')  # a kill mid-write
  _damage(work, 4)

  with caplog.at_level(logging.WARNING, "grain_jax.train"):
    loop.train_and_evaluate(cfg(6), work, progress=False)
  warnings = " ".join(r.getMessage() for r in caplog.records)
  assert "checkpoint step 4 in" in warnings and "resuming from step 2 instead" in warnings
  assert "damaged line" in warnings
  assert os.listdir(os.path.join(work, "checkpoints_unreadable")) == ["4"]
  again = _log(work)
  assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
  assert again[:4] == first  # steps 3 and 4 redone from step 2 exactly as the first time
  assert weights.load_weights(os.path.join(work, "weights"))[2]["sources"]["trained_steps"] == 6

  for step in (2, 4, 6):
    _damage(work, step)
  capsys.readouterr()
  from grain_jax import cli
  rc = cli.main(["train", "--config", TINY, "--workdir", work, "--noprogress",
                 f"--config.data.train={pictures}", "--config.max_steps=8"])
  gc.collect()  # Orbax's abandoned reads report when collected: that too must stay quiet
  err = capsys.readouterr().err
  assert rc == 2 and re.search(r"error: no checkpoint in \S+ can be restored \(steps 6, 4, 2; "
                               r"latest: ValueError: OUT_OF_RANGE", err), err
  assert "Traceback" not in err and "never retrieved" not in err, err


def test_initial_weights_that_do_not_fit_are_named(pictures, tmp_path, capsys):
  from grain_jax.formats import weights
  from grain_jax.nets import registry
  from grain_jax.nets.model import placeholder_values
  cfg = tiny_training()
  wide = tiny_training(**{"model.rescaler.nf": 16}).model
  rescaler = placeholder_values(registry.expected_variables("rescaler", wide))
  weights.save_weights(str(tmp_path / "wide"), {"rescaler": rescaler}, wide, {})
  rc, err = _train_cli(capsys, tmp_path / "w", f"--config.data.train={pictures}",
                       f"--config.init.weights={tmp_path / 'wide'}")
  assert rc == 2 and len(_errors(err)) == 1, err
  assert (f"init.weights {tmp_path / 'wide'}: network 'rescaler' does not fit the config: "
          f"params/decoder/conv_first/bias is (16,) there, the config's model expects (8,)"
          ) in err[-1]

  nan = {"rescaler": placeholder_values(registry.expected_variables("rescaler", cfg.model))}
  nan["rescaler"]["params"]["encoder"]["conv_first"]["bias"][0] = np.nan
  weights.save_weights(str(tmp_path / "nan"), nan, cfg.model, {})
  rc, err = _train_cli(capsys, tmp_path / "w", f"--config.data.train={pictures}",
                       f"--config.init.weights={tmp_path / 'nan'}")
  assert rc == 2 and "network 'rescaler' has 1 non-finite values" in _errors(err)[0], err


def test_checkpoints_from_before_the_divergence_guard_still_resume(pictures, tmp_path):
  """A workdir of the previous version (its train state has no guard counters, its data
  position is one JSON item) resumes to the same steps as one of this version."""
  import shutil

  import orbax.checkpoint as ocp
  from grain_jax.train import loop
  cfg = lambda steps: tiny_training(**{"data.train": pictures, "max_steps": steps})
  new, old = str(tmp_path / "new"), str(tmp_path / "old")
  loop.train_and_evaluate(cfg(2), new, progress=False)
  manager = lambda w: ocp.CheckpointManager(
      os.path.join(w, "checkpoints"), item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "data": ocp.JsonCheckpointHandler()})
  args = ocp.args
  src, dst = manager(new), manager(old)
  state = src.restore(2, args=args.Composite(state=args.StandardRestore()))["state"]
  # On disk, per tensor (the train state packs them: train/packed.py).
  assert set(state["params"]["fast"]) == {"rescaler"}
  # Neither the guard's counters nor the schedule length (added later still).
  state = {k: v for k, v in state.items()
           if not k.startswith("nonfinite") and k != "schedule_steps"}
  with open(os.path.join(new, "checkpoints", "2", "host_data", "process_0-of-1.json")) as f:
    position = json.load(f)  # then saved as one JSON item, 'data'
  dst.save(2, args=args.Composite(state=args.StandardSave(state),
                                  data=args.JsonSave(position)))
  dst.wait_until_finished()
  src.close()
  dst.close()
  shutil.copy(os.path.join(new, "config.json"), os.path.join(old, "config.json"))

  for w in (new, old):
    loop.train_and_evaluate(cfg(4), w, progress=False)
  assert [r["step"] for r in _log(old)] == [3, 4]
  assert _log(old) == _log(new)[2:]


def test_a_state_with_a_non_finite_value_anywhere_is_not_finite():
  import jax.numpy as jnp

  from grain_jax.train.state import TrainState, state_is_finite
  counters = dict(step=jnp.array(3), rng=jnp.zeros(2, jnp.uint32), nonfinite_run=jnp.array(0),
                  nonfinite_total=jnp.array(0), schedule_steps=jnp.array(9))
  state = lambda fields: TrainState(**counters, **fields)
  ok = lambda: dict(params={"w": jnp.ones((3, 3)), "b": jnp.zeros(3, jnp.bfloat16)},
                    opt_state=({"mu": jnp.zeros(3)}, jnp.array(7, jnp.int32)),
                    frozen={"g": jnp.ones(2)}, d_params={}, d_opt_state=(),
                    d_batch_stats={"var": jnp.ones(4)})
  assert state_is_finite(state(ok()))
  for part, key, bad in (("opt_state", None, jnp.inf), ("params", "b", jnp.nan),
                         ("frozen", "g", jnp.nan), ("d_batch_stats", "var", -jnp.inf)):
    fields = ok()
    if key is None:
      fields[part] = ({"mu": jnp.zeros(3).at[1].set(bad)}, fields[part][1])
    else:
      fields[part][key] = fields[part][key].at[0].set(bad)
    assert not state_is_finite(state(fields)), part


def test_the_step_guard_finds_a_non_finite_value_in_any_group_of_leaves(monkeypatch):
  """all_finite checks leaves in concatenated groups: a value in a small leaf of a group, in a
  leaf too large to share a group, or in a leaf of another dtype is still found."""
  import jax
  import jax.numpy as jnp

  from grain_jax.train import state
  monkeypatch.setattr(state, "FINITE_CHECK_ELEMENTS", 8)
  tree = {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "c": jnp.ones(5), "big": jnp.ones((3, 4)),
          "half": jnp.ones(2, jnp.bfloat16), "count": jnp.array([7], jnp.int32)}
  check = jax.jit(state.all_finite)
  assert check(tree)
  for key in ("a", "b", "c", "big", "half"):
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      leaf = tree[key]
      broken = dict(tree, **{key: leaf.reshape(-1).at[-1].set(bad).reshape(leaf.shape)})
      assert not check(broken), (key, bad)
  assert state.all_finite({}) and state.all_finite({"n": jnp.arange(3)})


def test_a_checkpoint_holding_a_nan_is_refused_and_kept(pictures, tmp_path, capsys):
  """The state is checked once, where a run starts: a checkpoint with a NaN (written by
  hand here, as a damaged or foreign one would be) stops the run before any step, and stays."""
  import jax
  import orbax.checkpoint as ocp
  from grain_jax.train import loop
  work = tmp_path / "w"
  loop.train_and_evaluate(tiny_training(**{"data.train": pictures, "max_steps": 2}),
                          str(work), progress=False)
  mgr = ocp.CheckpointManager(
      os.path.join(work, "checkpoints"), item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                         "data": ocp.JsonCheckpointHandler()})
  a = ocp.args
  state = mgr.restore(2, args=a.Composite(state=a.StandardRestore()))["state"]
  leaves, tree = jax.tree_util.tree_flatten(state["params"])
  leaves[0] = np.asarray(leaves[0]).copy()
  leaves[0].flat[0] = np.nan  # one trained weight
  state["params"] = jax.tree_util.tree_unflatten(tree, leaves)
  state["step"] = np.asarray(3, np.asarray(state["step"]).dtype)
  with open(os.path.join(work, "checkpoints", "2", "host_data", "process_0-of-1.json")) as f:
    position = json.load(f)
  mgr.save(3, args=a.Composite(state=a.StandardSave(state), data=a.JsonSave(position)))
  mgr.wait_until_finished()
  mgr.close()
  rc, err = _train_cli(capsys, work, f"--config.data.train={pictures}", "--config.max_steps=5")
  assert rc == 2, err
  assert "checkpoint 3 in" in _errors(err)[0] and "holds NaN or infinite values" in \
      _errors(err)[0], err
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "3"]
  assert [r["step"] for r in _log(work)] == [1, 2]


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_rerun_is_identical(
    pictures, tmp_path, capsys, monkeypatch):
  """SIGTERM (a preemption, SLURM's time limit) during step 3 of 6, with no checkpoint due
  before the end: the run finishes step 3, checkpoints it, exits 75; the same command
  resumes at step 3 and ends bit-identical to an uninterrupted run. The handlers are
  restored afterwards."""
  import chex
  import grain_jax
  from grain_jax.train import stopping

  args = [f"--config.data.train={pictures}", "--config.max_steps=6",
          "--config.checkpoint_every=0"]
  assert _train_cli(capsys, tmp_path / "straight", *args)[0] == 0
  hook_training_step(monkeypatch, signal_at(3, signal.SIGTERM))
  rc, err = _train_cli(capsys, tmp_path / "stopped", *args)
  assert rc == stopping.EXIT_INTERRUPTED == 75
  assert any("stopped at step 3 (SIGTERM) with a checkpoint" in line for line in err), err
  assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["3"]
  assert [r["step"] for r in _log(tmp_path / "stopped")] == [1, 2, 3]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  monkeypatch.undo()
  assert _train_cli(capsys, tmp_path / "stopped", *args)[0] == 0
  a, b = (grain_jax.load(str(tmp_path / w)) for w in ("straight", "stopped"))
  chex.assert_trees_all_equal(a.variables, b.variables)
  assert _log(tmp_path / "stopped") == _log(tmp_path / "straight")


def test_time_limit_and_a_chosen_signal_stop_the_same_way_and_ctrl_c_twice_at_once(
    pictures, tmp_path, capsys, monkeypatch):
  from grain_jax.train import stopping
  from grain_jax.util import runs

  calls = []
  monkeypatch.setattr(runs, "clock", lambda: calls.append(1) or (100.0 if len(calls) > 3
                                                                   else 0.0))
  rc, err = _train_cli(capsys, tmp_path / "limit", f"--config.data.train={pictures}",
                       "--config.max_steps=8", "--config.time_limit_s=50")
  assert rc == 75 and any("(time_limit_s)" in line for line in err), err
  assert _log(tmp_path / "limit")[-1]["step"] < 8
  monkeypatch.undo()

  usr1 = stopping.Requests(tiny_training(stop_signal="SIGUSR1"), 0.0, lambda: 0.0)
  usr1.install()
  try:  # a chosen signal (SLURM's --signal=USR1@120) is a stop request like SIGTERM
    assert usr1.due(1) is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert usr1.due(2) == "SIGUSR1"
  finally:
    usr1.restore()
  requests = stopping.Requests(tiny_training(), 0.0, lambda: 0.0)
  requests.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C asks for a clean stop
    assert requests.due(1) == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # the second stops at once
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    requests.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  with pytest.raises(ValueError, match="SIGNOPE"):
    stopping.Requests(tiny_training(stop_signal="SIGNOPE"), 0.0, lambda: 0.0)


def _simulated_filesystem(monkeypatch, workdir, size):
  """Makes the free-space check see `workdir` on a filesystem of `size` bytes: free is
  `size` less what the workdir holds."""
  from grain_jax.util import disk_space
  monkeypatch.setattr(disk_space, "free_bytes",
                      lambda path: max(0, size - disk_space.folder_bytes(str(workdir))))


def _fail_writes_under(monkeypatch, fragment):
  """Makes the files Orbax writes from Python (through etils.epath: metadata, commit
  markers, the data position) fail with ENOSPC under paths containing `fragment`, as a
  full disk would."""
  import errno
  from etils import epath
  cls = type(epath.Path(ROOT))
  for name in ("write_text", "write_bytes"):
    def failing(self, *args, _original=getattr(cls, name), **kwargs):
      if fragment in os.fspath(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, failing)


def _sizes(workdir):
  from grain_jax.util import disk_space
  return {n: disk_space.folder_bytes(os.path.join(workdir, "checkpoints", n))
          for n in os.listdir(os.path.join(workdir, "checkpoints"))}


def test_a_checkpoint_that_would_not_fit_makes_room_or_stops_before_writing(
    pictures, tmp_path, capsys, caplog, monkeypatch):
  """Before each save the free space is compared with the last checkpoint and export: on a
  filesystem with room for two checkpoints, keep_checkpoints=2 removes the oldest before
  writing the next (it would go anyway) and the run ends; with keep_checkpoints=3 nothing
  may be removed, so the run stops before writing, in one line, its checkpoints intact."""
  from grain_jax.train import checkpoints
  from grain_jax.util import disk_space
  work = tmp_path / "w"
  rc, err = _train_cli(capsys, work, f"--config.data.train={pictures}", "--config.max_steps=2")
  assert rc == 0, err
  ckpt = disk_space.folder_bytes(str(work / "checkpoints" / "2"))
  # Room for what the workdir holds now and the next save with half a checkpoint to spare:
  # the save after it fits only once the oldest checkpoint is gone (checkpoints differ in
  # size by a few percent as they compress differently).
  need = checkpoints.space_needed(ckpt + disk_space.folder_bytes(str(work / "weights")))
  _simulated_filesystem(monkeypatch, work, disk_space.folder_bytes(str(work)) + need + ckpt // 2)
  with caplog.at_level(logging.WARNING, "grain_jax.train"):
    rc, err = _train_cli(capsys, work, f"--config.data.train={pictures}",
                         "--config.max_steps=6", "--config.keep_checkpoints=2")
  assert rc == 0, err
  made_room = [r.getMessage() for r in caplog.records if "to make room" in r.getMessage()]
  assert len(made_room) == 1 and made_room[0].startswith(
      "checkpoint 2 removed before saving step 6"), made_room
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6"]

  rc, err = _train_cli(capsys, work, f"--config.data.train={pictures}",
                       "--config.max_steps=8", "--config.keep_checkpoints=3")
  assert rc == 2 and len(_errors(err)) == 1, err
  assert re.search(r"error: not enough space to save checkpoint step 8 in \S+: it and the "
                   r"weights need about [\d.]+ MB, [\d.]+ MB is free; the last checkpoint is "
                   r"step 6 in \S+: free some space \(or lower keep_checkpoints\) and run the "
                   r"same command again to resume from it$", err[-1]), err
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6"]
  assert [r["step"] for r in _log(work)][-1] == 8  # trained, but lost: it could not be saved


def test_a_write_that_fails_for_lack_of_space_stops_in_one_line_and_resumes(
    pictures, tmp_path, capsys, caplog, monkeypatch):
  """A checkpoint whose write fails with ENOSPC part-way (the space check passed, but the
  disk filled meanwhile): exit status 2 with one line naming the checkpoint and the last
  good one, none of Orbax's or asyncio's tracebacks, the partial checkpoint removed; after
  space is freed the same command resumes from the last good checkpoint to the end. The
  weights export fails the same way, keeping the weights that were there."""
  from grain_jax.formats import weights
  from grain_jax.nets.model import placeholder_values
  from grain_jax.nets import registry
  work = tmp_path / "w"
  args = [f"--config.data.train={pictures}", "--config.max_steps=6"]
  _fail_writes_under(monkeypatch, os.path.join(str(work), "checkpoints", "4"))
  with caplog.at_level(logging.INFO):
    rc, err = _train_cli(capsys, work, *args)
    gc.collect()  # abandoned futures report when collected: that too must stay quiet
  err += capsys.readouterr().err.splitlines()
  assert rc == 2 and len(_errors(err)) == 1, err
  assert re.search(r"error: no space left to save checkpoint step 4 in \S+ \([\d.,]+ MB is "
                   r"free\); the partial checkpoint was removed and the last checkpoint is step "
                   r"2 in \S+: free some space \(or lower keep_checkpoints\) and run the same "
                   r"command again to resume from it$", err[-1]), err
  assert "Traceback" not in "\n".join(err), err
  noise = [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert not noise, [r.getMessage()[:200] for r in noise]
  assert sorted(os.listdir(work / "checkpoints")) == ["2"]
  monkeypatch.undo()
  rc, err = _train_cli(capsys, work, *args)
  assert rc == 0 and sorted(os.listdir(work / "checkpoints")) == ["2", "4", "6"], err
  assert [r["step"] for r in _log(work)] == [1, 2, 3, 4, 5, 6]

  cfg = tiny_training().model
  tree = {"rescaler": placeholder_values(registry.expected_variables("rescaler", cfg))}
  _fail_writes_under(monkeypatch, ".grain_weights")
  with pytest.raises(OSError, match=r"no space left to write the weights to \S+/weights: they "
                                    r"need about [\d.]+ MB, [\d.,]+ MB is free; the weights "
                                    r"there are as they were$"):
    weights.save_weights(str(work / "weights"), tree, cfg, {}, force=True)
  assert weights.load_weights(str(work / "weights"))[2]["sources"]["trained_steps"] == 6
