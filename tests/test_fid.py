"""`grain-jax fid` against `python -m pytorch_fid` (its main, same synthetic weights of the real
layout), .npz statistics both ways, KID, and the errors a user meets; the Frechet distance
against pytorch-fid's and KID against torch-fidelity's."""
import contextlib
import io
import os
import shutil
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import import_torchvision
from grain_jax.eval import fid
from test_inception import pt_inception_state_dict

import_torchvision()  # before pytorch_fid imports it

N = 72  # images per folder: more than 64 + 1, so the 64-d covariances are not singular


def _crops(rng, n, size=40):
  pics = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
          skimage.data.rocket()]
  out = []
  for i in range(n):
    p = pics[i % len(pics)]
    y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
    out.append(p[y:y + size, x:x + size])
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two folders of N 40x40 crops (B blurred and noisier, one of them grayscale JPEGs) and
  pytorch-fid's weight file (synthetic values)."""
  root = tmp_path_factory.mktemp("fid")
  rng = np.random.default_rng(0)
  a, b = root / "a", root / "b"
  a.mkdir(), b.mkdir()
  for i, img in enumerate(_crops(rng, N)):
    Image.fromarray(img).save(a / f"{i:03d}.png")
  for i, img in enumerate(_crops(rng, N)):
    noisy = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(noisy)
    if i % 10 == 0:
      im.convert("L").save(b / f"{i:03d}.jpg", quality=95)  # pytorch-fid converts to RGB
    else:
      im.save(b / f"{i:03d}.png")
  (b / "notes.txt").write_text("not an image: both tools skip it")
  sd = pt_inception_state_dict()
  pth = root / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(sd, pth)
  return {"a": str(a), "b": str(b), "pth": str(pth), "sd": sd, "root": root}


def _pytorch_fid(monkeypatch, setup, *args) -> float:
  """`python -m pytorch_fid ARGS` (its main), the weights 'download' answered locally."""
  import pytorch_fid.fid_score as fs
  import pytorch_fid.inception as pfi

  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: setup["sd"])
  monkeypatch.setattr(sys, "argv", ["pytorch_fid", "--device", "cpu", "--num-workers", "0",
                                    *map(str, args)])
  out = io.StringIO()
  with contextlib.redirect_stdout(out), torch.no_grad():
    fs.main()
  return float(out.getvalue().split("FID:")[-1].split()[0]) if "FID:" in out.getvalue() else None


def _ours(capsys, *args):
  from grain_jax import cli

  code = cli.main(["fid", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out, out.err


def _value(text, key):
  return float(text.split(f"{key}:")[1].split()[0])


def test_fid_matches_pytorch_fid_and_stats_files_work_both_ways(setup, monkeypatch, capsys):
  want = _pytorch_fid(monkeypatch, setup, "--dims", 64, setup["a"], setup["b"])
  code, out, err = _ours(capsys, setup["a"], setup["b"], "--inception", setup["pth"],
                         "--dims", 64, "--batch_size", 16, "--kid")
  assert code == 0, err
  got = _value(out, "FID")
  assert abs(got - want) <= 1e-3 * abs(want), (got, want)  # the bar; ~1e-6 here
  assert abs(got - want) <= 1e-5 * abs(want), (got, want)
  kid = _value(out, "KID")
  assert 0 < kid and "+-" in out

  # --save_stats writes pytorch-fid's .npz: pytorch-fid reads ours, we read its.
  npz = setup["root"] / "a_stats.npz"
  code, out, err = _ours(capsys, "--save_stats", setup["a"], npz, "--inception",
                         setup["pth"], "--dims", 64)
  assert code == 0 and npz.exists(), err
  assert abs(_pytorch_fid(monkeypatch, setup, "--dims", 64, npz, setup["b"]) - want) \
      <= 1e-5 * want
  theirs = setup["root"] / "b_theirs.npz"
  _pytorch_fid(monkeypatch, setup, "--dims", 64, "--save-stats", setup["b"], theirs)
  code, out, err = _ours(capsys, npz, theirs, "--inception", setup["pth"], "--dims", 64)
  assert code == 0, err
  assert abs(_value(out, "FID") - want) <= 1e-5 * want
  # Our .npz keeps the features, so KID from the file equals KID from the folder.
  code, out, err = _ours(capsys, npz, setup["b"], "--inception", setup["pth"], "--dims", 64,
                         "--kid")
  assert code == 0 and abs(_value(out, "KID") - kid) <= 1e-5 * abs(kid), err
  # pytorch-fid's file has no features: KID from it is refused, before any work.
  code, out, err = _ours(capsys, theirs, setup["b"], "--inception", setup["pth"], "--dims",
                         64, "--kid")
  assert code == 2 and "no features stored" in err and "b_theirs.npz" in err


def test_converted_weights_folder_gives_the_same_fid(setup, capsys, tmp_path):
  """The converted weights folder gives the .pth file's features, bit for bit (on 8 images:
  equal features make equal FIDs)."""
  from conftest import convert_cli

  res = convert_cli(tmp_path / "w", "--inception", setup["pth"])
  assert res.returncode == 0, res.stderr
  few = tmp_path / "few"
  few.mkdir()
  for name in sorted(os.listdir(setup["a"]))[:8]:
    shutil.copy(os.path.join(setup["a"], name), few / name)
  stats = {}
  for name, weights in (("pth", setup["pth"]), ("folder", tmp_path / "w")):
    stats[name] = tmp_path / f"{name}.npz"
    code, _, err = _ours(capsys, "--save_stats", few, stats[name], "--inception", weights,
                         "--dims", 64)
    assert code == 0, err
  a, b = np.load(stats["pth"]), np.load(stats["folder"])
  assert sorted(a.files) == sorted(b.files) and "features" in a.files
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_errors_name_the_problem(setup, capsys, tmp_path, monkeypatch):
  missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  code, _, err = _ours(capsys, setup["a"], setup["b"], "--inception", missing)
  assert code == 2 and "no such file" in err and "github.com/mseitzer/pytorch-fid" in err
  wrong = tmp_path / "other.pth"
  torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
  code, _, err = _ours(capsys, setup["a"], setup["b"], "--inception", wrong)
  assert code == 2 and "Conv2d_1a_3x3" in err, err
  empty = tmp_path / "empty"
  empty.mkdir()
  # Refused before the first folder is read.
  read = []
  monkeypatch.setattr(fid, "folder_features", lambda folder, *a, **k: read.append(folder))
  code, _, err = _ours(capsys, setup["a"], empty, "--inception", setup["pth"], "--dims", 64)
  assert code == 2 and "at least 2 images" in err and "empty" in err and not read, err
  monkeypatch.undo()
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("x.png", "y.png"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / name)
  (broken / "z.png").write_bytes(b"\x89PNG broken")
  code, _, err = _ours(capsys, broken, setup["a"], "--inception", setup["pth"], "--dims", 64)
  assert code == 2 and "z.png" in err and "not a readable image" in err
  code, _, err = _ours(capsys, setup["a"], tmp_path / "nothing", "--inception", setup["pth"])
  assert code == 2 and "neither a folder of images nor an .npz file" in err
  bad = tmp_path / "bad.npz"
  np.savez(bad, mean=np.zeros(64))
  code, _, err = _ours(capsys, bad, setup["b"], "--inception", setup["pth"], "--dims", 64)
  assert code == 2 and "'mu' and 'sigma'" in err
  stats64 = tmp_path / "stats64.npz"
  np.savez(stats64, mu=np.zeros(64), sigma=np.eye(64))
  # Both .npz: refused before the Inception network is loaded (a missing .pth is not reached).
  code, _, err = _ours(capsys, stats64, stats64, "--inception", missing, "--dims", 192)
  assert code == 2 and "64 dimensions, but 192 were asked for" in err, err
  code, _, err = _ours(capsys, stats64, stats64, "--inception", missing, "--dims", 64, "--kid")
  assert code == 2 and "no features stored, and KID needs them" in err, err
  code, out, err = _ours(capsys, stats64, stats64, "--inception", missing, "--dims", 64)
  assert code == 0 and _value(out, "FID") == 0.0, err


def test_frechet_distance_matches_pytorch_fid():
  from pytorch_fid.fid_score import calculate_frechet_distance

  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 64))
  b = rng.normal(size=(150, 64)) * 1.1 + 0.2
  (m1, s1), (m2, s2) = fid.statistics(a), fid.statistics(b)
  want = calculate_frechet_distance(m1, s1, m2, s2)
  assert abs(fid.frechet_distance(m1, s1, m2, s2) - want) <= 1e-6 * abs(want)


def test_kid_matches_torch_fidelity():
  from torch_fidelity.metric_kid import kid_features_to_metric

  rng = np.random.default_rng(3)
  a = rng.normal(size=(120, 32)).astype(np.float32)
  b = (rng.normal(size=(90, 32)) * 1.2 + 0.1).astype(np.float32)
  want = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20,
                                kid_subset_size=50, verbose=False)
  mean, std = fid.kernel_inception_distance(a, b, subsets=20, subset_size=50)
  # The same subsets; torch-fidelity sums kernels of float32 features in float32, we in
  # float64: they differ by float32 rounding (~4e-6 relative here).
  assert abs(mean - want["kernel_inception_distance_mean"]) <= 2e-5 * abs(mean)
  assert abs(std - want["kernel_inception_distance_std"]) <= 2e-5 * std
  # Sets smaller than the subset size: the whole smaller set, as --kid-subset-size would.
  small = fid.kernel_inception_distance(a[:30], b, subsets=5)
  ref = kid_features_to_metric(torch.from_numpy(a[:30]), torch.from_numpy(b), kid_subsets=5,
                               kid_subset_size=30, verbose=False)
  assert abs(small[0] - ref["kernel_inception_distance_mean"]) <= 2e-5 * abs(small[0])
