"""grain_jax.evaluate: metrics against an independent computation from the written files,
the padded last batch, bad files, TFDS splits and data parallelism over 2 CPU devices."""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import skimage.metrics
from PIL import Image

from conftest import ROOT, xla_flags
from grain_jax import datasets, evaluate, images
from grain_jax.quantizer import lr_to_uint8, quantize
from test_images_metrics import make_tfds_dataset

SAMPLE = os.path.join(ROOT, "grain_jax", "samples", "astronaut_face.png")
KEYS = ("num_images", "hr_psnr", "hr_ssim", "lr_psnr", "bicubic_psnr", "bicubic_ssim",
        "hr_lpips", "bicubic_lpips", "hr_inv_psnr", "hr_gan_ssim")


@pytest.fixture(scope="module")
def evaluator(small_model):
  """Batch 2 (so 3 images leave a padded last batch), LPIPS on, images returned."""
  return evaluate.Evaluator(small_model.model, small_model.variables, 2,
                            small_model.lpips_params, with_images=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 good pictures (exact size, larger, non-square grayscale) and one corrupt file."""
  d = tmp_path_factory.mktemp("eval_images")
  rgb = np.asarray(Image.open(SAMPLE))
  Image.fromarray(rgb).resize((64, 64), Image.BICUBIC).save(d / "a_exact.png")
  Image.fromarray(rgb).save(d / "b_large.png")
  Image.fromarray(rgb[40:200, :, 1]).save(d / "c_gray.jpg")
  (d / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  return d


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _png(path):
  return np.asarray(Image.open(path)).astype(np.float64)


def _ssim(a, b):
  return skimage.metrics.structural_similarity(
      a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False)


def test_metrics_match_an_independent_computation_from_the_files(evaluator, small_model,
                                                                 folder, tmp_path):
  out = tmp_path / "eval"
  summary = evaluate.evaluate(evaluator, datasets.FolderSource(str(folder)), str(out),
                              progress=False)
  meta = json.loads((out / "metrics.json").read_text())
  assert meta == summary
  assert all(meta[k] is not None for k in KEYS)
  assert meta["num_images"] == 3 and meta["num_failed"] == 1 and meta["num_resized"] == 2
  assert "d_corrupt.png" in meta["failed"][0]["file"]
  rows = _csv(out / "per_image.csv")
  assert [r["file"] for r in rows] == ["a_exact.png", "b_large.png", "c_gray.jpg"]
  for k in evaluator.names:  # the JSON holds the means of the CSV columns
    assert abs(np.mean([float(r[k]) for r in rows]) - meta[k]) < 1e-9, k
  for sub in ("lr", "invrrdb", "stylegan", "fusion", "comp"):
    assert sorted(os.listdir(out / sub)) == ["a_exact.png", "b_large.png", "c_gray.png"], sub

  hr = small_model.hr_size
  for row in rows:  # c_gray sits in the padded last batch
    src, name = row["file"], os.path.splitext(row["file"])[0] + ".png"
    x = images.to_model(images.resize_square(images.read_image(str(folder / src))[0], hr))[None]
    gt = images.to_uint8(x)[0].astype(np.float64)
    # The written images are the model's outputs (batch 1 here, 2 in the evaluator).
    lr = small_model.downscale(x)
    np.testing.assert_array_equal(_png(out / "lr" / name), lr_to_uint8(lr)[0])
    mem = small_model.upscale(lr)
    for key, sub in (("hr", "fusion"), ("hr_inv", "invrrdb"), ("hr_gan", "stylegan")):
      got = _png(out / sub / name)
      assert np.abs(got - images.to_uint8(mem[key])[0]).max() <= 1, (name, key)
      assert abs(float(row[f"{key}_psnr"])
                 - skimage.metrics.peak_signal_noise_ratio(gt, got, data_range=255)) < 1e-3
      assert abs(float(row[f"{key}_ssim"]) - _ssim(gt, got)) < 1e-4
    comp = _png(out / "comp" / name)
    np.testing.assert_array_equal(comp[:, 3 * hr:], gt)
    np.testing.assert_array_equal(comp[:, 2 * hr:3 * hr], _png(out / "fusion" / name))
    want_lpips = small_model.lpips(_png(out / "fusion" / name)[None] / 127.5 - 1,
                                   gt[None] / 127.5 - 1)
    assert abs(float(row["hr_lpips"]) - float(want_lpips[0])) < 1e-5
    # Baseline: bicubic to an 8-bit LR, bicubic back up (jax.image.resize, antialiased).
    bic_lr = quantize(jax.image.resize(x, (1, 4, 4, 3), "bicubic"))
    bic = images.to_uint8(jax.image.resize(bic_lr, (1, hr, hr, 3), "bicubic"))[0]
    assert abs(float(row["bicubic_psnr"]) - skimage.metrics.peak_signal_noise_ratio(
        gt, bic.astype(np.float64), data_range=255)) < 1e-3
    assert abs(float(row["bicubic_ssim"]) - _ssim(gt, bic.astype(np.float64))) < 1e-4
    assert abs(float(row["lr_psnr"]) - skimage.metrics.peak_signal_noise_ratio(
        lr_to_uint8(bic_lr)[0].astype(np.float64), _png(out / "lr" / name),
        data_range=255)) < 1e-3


def test_step_is_compiled_once_for_one_batch_shape(evaluator):
  # Compiled ahead of time: another batch shape is refused rather than recompiled.
  assert isinstance(evaluator.step, jax.stages.Compiled)
  with pytest.raises(ValueError, match="expected a batch"):
    evaluator(np.zeros((3, 64, 64, 3), np.float32))


def test_tfds_split_with_a_corrupt_record(evaluator, tmp_path):
  pics = [np.asarray(Image.open(SAMPLE).resize((64, 64)))] * 3
  name = make_tfds_dataset(tmp_path / "tfds", pics, names=["p.jpg", "q.jpg", "r.jpg"],
                           corrupt={1})
  src = datasets.open_source(f"tfds:{name}/test", str(tmp_path / "tfds"))
  summary = evaluate.evaluate(evaluator, src, str(tmp_path / "out"), progress=False)
  assert summary["num_images"] == 2 and summary["num_failed"] == 1
  assert summary["failed"][0]["file"] == "q.jpg"
  rows = _csv(tmp_path / "out" / "per_image.csv")
  assert sorted(r["file"] for r in rows) == ["p.jpg", "r.jpg"]
  assert sorted(os.listdir(tmp_path / "out" / "fusion")) == ["p.png", "r.png"]
  assert rows[0]["hr_psnr"] == rows[1]["hr_psnr"]  # the same picture twice


def test_two_devices_give_the_same_metrics(evaluator, small_weights, folder, tmp_path):
  one = tmp_path / "one"
  evaluate.evaluate(evaluator, datasets.FolderSource(str(folder)), str(one), progress=False)
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
             JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run(
      [sys.executable, "-m", "grain_jax", "evaluate", "--checkpoint", small_weights, "--data",
       str(folder), *a], cwd=ROOT, env=env, capture_output=True, text=True)
  res = run("--out", str(tmp_path / "bad"), "--batch_size", "3")
  assert res.returncode == 2 and "not a multiple of the 2 local devices" in res.stderr
  res = run("--out", str(tmp_path / "two"), "--batch_size", "2", "--save_images")
  assert res.returncode == 1, res.stderr  # 1: the corrupt file is reported as failed
  assert "skipped d_corrupt.png" in res.stderr and "hr_psnr" in res.stdout
  meta = json.loads((tmp_path / "two" / "metrics.json").read_text())
  assert meta["devices"] == 2 and meta["num_images"] == 3
  for a, b in zip(_csv(one / "per_image.csv"), _csv(tmp_path / "two" / "per_image.csv")):
    assert a["file"] == b["file"]
    for k in evaluator.names:
      assert abs(float(a[k]) - float(b[k])) < 1e-4, (a["file"], k, a[k], b[k])


class _Stop(BaseException):
  """Stops evaluate() mid-run (as a kill would): not an image error it could skip."""


class _StoppingSource:
  files = []
  description = "stopping"

  def __len__(self):
    return 2

  def name(self, i):
    return f"{i}.png"

  def load(self, i):
    raise _Stop()


def test_a_stopped_run_leaves_no_stale_results(evaluator, folder, tmp_path):
  out = tmp_path / "out"
  evaluate.evaluate(evaluator, datasets.FolderSource(str(folder)), str(out), progress=False)
  assert (out / "metrics.json").exists() and (out / "per_image.csv").exists()
  with pytest.raises(_Stop):
    evaluate.evaluate(evaluator, _StoppingSource(), str(out), progress=False)
  # The previous run's results are gone (its images stay, overwritten by name next time).
  assert not (out / "metrics.json").exists() and not (out / "per_image.csv").exists()
  assert [f for f in os.listdir(out) if f.startswith(".")] == []  # no temp files either


def test_out_inside_the_data_folder_is_refused(evaluator, folder):
  for out in (folder, folder / "eval"):
    with pytest.raises(ValueError, match=f"{out} is inside the data folder {folder}"):
      evaluate.evaluate(evaluator, datasets.FolderSource(str(folder)), str(out), progress=False)
  assert not (folder / "eval").exists() and not (folder / "metrics.json").exists()


def test_non_finite_outputs_give_null_means_not_a_truncated_file(evaluator, small_model, folder,
                                                                 tmp_path):
  nan = jax.tree_util.tree_map(lambda a: np.full(a.shape, np.nan, a.dtype),
                               small_model.variables)
  evaluator.set_variables(nan)  # same shapes: no recompilation
  try:
    summary = evaluate.evaluate(evaluator, datasets.FolderSource(str(folder)),
                                str(tmp_path / "out"), progress=False)
  finally:
    evaluator.set_variables(small_model.variables)
  meta = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert meta == summary and meta["num_images"] == 3 and meta["num_nonfinite"] == 3
  assert meta["hr_psnr"] is None and meta["bicubic_psnr"] is not None
  assert len(_csv(tmp_path / "out" / "per_image.csv")) == 3
