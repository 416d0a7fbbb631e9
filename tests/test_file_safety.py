"""Nothing of the user's is deleted, checks come before the work, and known failures are one
line: weights folders (convert, demo), evaluate's and rescale's outputs, damaged weights."""
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import ROOT, convert_cli
from grain_jax import cli
from grain_jax.formats import convert, weights
from grain_jax.util import files

SAMPLE = os.path.join(ROOT, "grain_jax", "samples", "astronaut_face.png")
ROOT_USER = os.geteuid() == 0  # root ignores permissions: read-only folders cannot be made


def _tree(value=0.5):
  return {"lpips": {"params": {"lin0": {"kernel": np.full((2, 3), value, np.float32)}}}}


def _save(path, value=0.5, force=False):
  return weights.save_weights(str(path), _tree(value), ml_collections.ConfigDict({"x": 1}), {},
                              force=force)


def _kernel(path):
  return weights.load_weights(str(path))[0]["lpips"]["params"]["lin0"]["kernel"]


def _users_folder(path):
  path.mkdir(parents=True)
  (path / "notes.txt").write_text("mine")
  (path / "sub").mkdir()
  (path / "sub" / "more.txt").write_text("also mine")
  return path


def _untouched(path):
  return (sorted(os.listdir(path)) == ["notes.txt", "sub"]
          and (path / "notes.txt").read_text() == "mine"
          and (path / "sub" / "more.txt").read_text() == "also mine")


def _one_line(capsys, argv, prog=None):
  rc = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, (argv, rc, err)
  assert err[0].startswith(f"grain-jax {prog or argv[0]}: error: "), err
  return err[0]


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_save_weights_replaces_only_weights_folders(tmp_path):
  users = _users_folder(tmp_path / "users")
  with pytest.raises(FileExistsError, match=f"{users} exists and is not a weights folder"):
    _save(users, force=True)
  assert _untouched(users)

  w = tmp_path / "w"
  _save(w)
  with pytest.raises(FileExistsError, match="pass --force"):
    _save(w, 2.0)
  (tmp_path / "w.old").mkdir()  # a sibling that a fixed rename target would have deleted
  (tmp_path / "w.old" / "keep.txt").write_text("mine")
  _save(w, 2.0, force=True)  # a weights folder is replaced
  assert (_kernel(w) == 2.0).all()
  assert (tmp_path / "w.old" / "keep.txt").read_text() == "mine"

  (tmp_path / "empty").mkdir()
  _save(tmp_path / "empty")  # an empty folder loses nothing
  assert (_kernel(tmp_path / "empty") == 0.5).all()
  (tmp_path / "afile").write_text("mine")
  with pytest.raises(FileExistsError, match="is not a folder"):
    _save(tmp_path / "afile", force=True)
  assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "users", "w", "w.old"]  # no temp


def test_stale_temp_folders_of_dead_writers_are_removed(tmp_path):
  host = socket.gethostname()
  prefix = weights.TEMP_PREFIX
  stale = tmp_path / f"{prefix}{host}-{_dead_pid()}-abc"
  live = tmp_path / f"{prefix}{host}-{os.getpid()}-abc"
  other_host = tmp_path / f"{prefix}elsewhere-{_dead_pid()}-abc"
  for d in (stale, live, other_host):
    d.mkdir()
    (d / "x").write_text("partial")
  _save(tmp_path / "w")
  assert not stale.exists() and live.exists() and other_host.exists()


def test_weights_moved_aside_by_a_killed_replace_are_restored(tmp_path):
  """A save killed between moving the old weights aside and renaming the new ones in: the
  next save puts the old ones back first instead of deleting them with the temp folder."""
  w = _save(tmp_path / "w")
  aside = tmp_path / f"{weights.TEMP_PREFIX}{socket.gethostname()}-{_dead_pid()}-xyz"
  aside.mkdir()
  os.rename(w, aside / "w")
  _save(tmp_path / "other")  # any save in the folder
  assert (_kernel(tmp_path / "w") == 0.5).all() and not aside.exists()
  with pytest.raises(FileExistsError, match="pass --force"):
    _save(tmp_path / "w", 2.0)  # it is back, so it needs --force like any weights folder


@pytest.mark.parametrize("mask,mode", [(0o022, 0o755), (0o027, 0o750)])
def test_weights_folders_get_the_users_umask(tmp_path, mask, mode):
  old = os.umask(mask)
  try:
    w = _save(tmp_path / "w")
  finally:
    os.umask(old)
  for d in ("", "variables"):
    assert os.stat(os.path.join(w, d)).st_mode & 0o777 == mode, d
  assert os.stat(os.path.join(w, weights.META)).st_mode & 0o777 == mode & 0o666


def test_convert_checks_out_before_converting(tmp_path, capsys, monkeypatch):
  def never(*a):
    raise AssertionError("converted before checking --out")
  monkeypatch.setattr(convert, "convert", never)
  users = _users_folder(tmp_path / "users")
  err = _one_line(capsys, ["convert", "--lpips", "builtin", "--force", "--out", str(users)])
  assert f"{users} exists and is not a weights folder" in err
  assert _untouched(users)
  (tmp_path / "afile").write_text("x")
  err = _one_line(capsys, ["convert", "--lpips", "builtin", "--out", str(tmp_path / "afile/w")])
  assert "cannot be made" in err and "afile is a file" in err
  if not ROOT_USER:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    err = _one_line(capsys, ["convert", "--lpips", "builtin", "--out", str(ro / "w")])
    assert "is not writable" in err and str(ro) in err


def test_demo_refuses_a_users_weights_folder_before_any_work(tmp_path, capsys, monkeypatch):
  from grain_jax.nets import model

  def never(*a, **k):
    raise AssertionError("the demo worked before checking")
  monkeypatch.setattr(model, "init_variables", never)
  users = _users_folder(tmp_path / "out" / "weights")
  err = _one_line(capsys, ["demo", "--out", str(tmp_path / "out")])
  assert f"{users} exists and is not a weights folder" in err and "OUT/weights" in err
  assert _untouched(users)
  (tmp_path / "afile").write_text("x")
  err = _one_line(capsys, ["demo", "--out", str(tmp_path / "afile" / "out")])
  assert "afile is a file" in err


def test_rescale_refuses_empty_inputs_and_unwritable_out_before_loading(tmp_path, capsys):
  # A checkpoint that does not exist: each error must come before loading it.
  nothing = str(tmp_path / "no_checkpoint")
  (tmp_path / "empty").mkdir()
  (tmp_path / "afile").write_text("x")
  for direction in ("down", "up"):
    err = _one_line(capsys, [direction, "--checkpoint", nothing, str(tmp_path / "empty"),
                             "--out", str(tmp_path / "o")])
    assert f"no images in {tmp_path / 'empty'}" in err
  err = _one_line(capsys, ["down", "--checkpoint", nothing, str(tmp_path / "gone"),
                           "--out", str(tmp_path / "o")])
  assert "no images in" in err and "gone: no such file or folder" in err
  err = _one_line(capsys, ["down", "--checkpoint", nothing, SAMPLE, "--out",
                           str(tmp_path / "afile" / "o")])
  assert "afile is a file" in err
  assert sorted(os.listdir(tmp_path)) == ["afile", "empty"]  # nothing made


def test_evaluate_refuses_out_inside_data_and_unwritable_out_before_loading(tmp_path, capsys):
  data = tmp_path / "data"
  (data / "sub").mkdir(parents=True)
  from PIL import Image
  Image.open(SAMPLE).save(data / "sub" / "a.png")
  nothing = str(tmp_path / "no_checkpoint")
  for out in (data, data / "eval", data / "sub" / "eval"):
    err = _one_line(capsys, ["evaluate", "--checkpoint", nothing, "--data", str(data),
                             "--out", str(out)])
    assert f"{out} is inside the data folder {data}" in err
  (tmp_path / "afile").write_text("x")
  err = _one_line(capsys, ["evaluate", "--checkpoint", nothing, "--data", str(data),
                           "--out", str(tmp_path / "afile" / "e")])
  assert "afile is a file" in err
  assert sorted(os.listdir(data)) == ["sub"] and os.listdir(data / "sub") == ["a.png"]


def test_non_finite_weights_are_refused_on_load(tmp_path, capsys):
  bad = _tree()
  bad["lpips"]["params"]["lin0"]["kernel"][1, 2] = np.nan
  weights.save_weights(str(tmp_path / "w"), bad, ml_collections.ConfigDict({"x": 1}), {})
  with pytest.raises(weights.WeightsError, match="network 'lpips' has 1 non-finite values "
                     r"\(NaN or infinity\) in params/lin0/kernel"):
    weights.load_weights(str(tmp_path / "w"))
  err = _one_line(capsys, ["up", "--checkpoint", str(tmp_path / "w"), SAMPLE, "--out",
                           str(tmp_path / "o")])
  assert "network 'lpips'" in err and not (tmp_path / "o").exists()


def test_convert_is_quiet_and_damaged_weights_are_one_line(tmp_path):
  """In processes of their own: library logging and the asyncio noise of a failed restore
  (written by background threads) are seen as a user sees them."""
  w = tmp_path / "w"
  res = convert_cli(w, "--lpips", "builtin")
  assert res.returncode == 0 and res.stderr == "", res.stderr
  res = convert_cli(w, "--lpips", "builtin", "--force", "--verbose")
  assert res.returncode == 0 and "orbax" in res.stderr  # the flag shows what is hidden

  data = os.path.join(w, "variables", "ocdbt.process_0", "d")
  biggest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  res = subprocess.run([sys.executable, "-m", "grain_jax", "up", "--checkpoint", str(w), SAMPLE,
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1, res.stderr
  assert "up: error: " in lines[0] and "cannot restore the weights" in lines[0]


def test_check_can_create_makes_nothing(tmp_path):
  target = tmp_path / "a" / "b"
  assert files.check_can_create(str(target)) == str(target)
  assert not (tmp_path / "a").exists()
