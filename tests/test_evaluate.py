"""grain-jax evaluate (eval/evaluate.py): metrics against an independent computation from the
written files, the padded last batch, bad files, TFDS splits and data parallelism over 2 CPU
devices."""
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
from grain_jax.data import sources
from grain_jax.eval import evaluate
from grain_jax.eval.evaluator import Evaluator
from grain_jax.formats import images
from grain_jax.nets.quantizer import lr_to_uint8, quantize
from test_images_metrics import make_tfds_dataset

SAMPLE = os.path.join(ROOT, "grain_jax", "samples", "astronaut_face.png")
KEYS = ("num_images", "hr_psnr", "hr_ssim", "lr_psnr", "bicubic_psnr", "bicubic_ssim",
        "hr_lpips", "bicubic_lpips", "hr_inv_psnr", "hr_gan_ssim")


@pytest.fixture(scope="module")
def evaluator(small_model):
  """Batch 2 (so 3 images leave a padded last batch), LPIPS on, images returned."""
  return Evaluator(small_model.model, small_model.variables, 2, small_model.lpips_params,
                   with_images=True)


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
  summary = evaluate.evaluate(evaluator, sources.FolderSource(str(folder)), str(out),
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
  for sub in ("lr", "bicubic", "invrrdb", "stylegan", "fusion", "gt", "comp"):
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
    # comp: labels, then LR (nearest) | bicubic | hr_inv | hr_gan | hr | ground truth, PSNRs
    comp = _png(out / "comp" / name)
    assert comp.shape[1] == 6 * hr
    head = (comp.shape[0] - hr) // 2  # the label strip above is as high as the PSNR strip below
    comp = comp[head:head + hr]
    np.testing.assert_array_equal(comp[:, 5 * hr:], gt)
    np.testing.assert_array_equal(_png(out / "gt" / name), gt)
    np.testing.assert_array_equal(comp[:, 4 * hr:5 * hr], _png(out / "fusion" / name))
    np.testing.assert_array_equal(comp[:, hr:2 * hr], _png(out / "bicubic" / name))
    k = hr // small_model.lr_size
    np.testing.assert_array_equal(comp[::k, :hr][:, ::k], _png(out / "lr" / name))
    want_lpips = small_model.lpips(_png(out / "fusion" / name)[None] / 127.5 - 1,
                                   gt[None] / 127.5 - 1)
    assert abs(float(row["hr_lpips"]) - float(want_lpips[0])) < 1e-5
    # Baseline: bicubic to an 8-bit LR, bicubic back up (jax.image.resize, antialiased).
    bic_lr = quantize(jax.image.resize(x, (1, 4, 4, 3), "bicubic"))
    bic = images.to_uint8(jax.image.resize(bic_lr, (1, hr, hr, 3), "bicubic"))[0]
    assert abs(float(row["bicubic_psnr"]) - skimage.metrics.peak_signal_noise_ratio(
        gt, bic.astype(np.float64), data_range=255)) < 1e-3
    assert abs(float(row["bicubic_ssim"]) - _ssim(gt, bic.astype(np.float64))) < 1e-4
    assert np.abs(_png(out / "bicubic" / name) - bic).max() <= 1
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
  src = sources.open_source(f"tfds:{name}/test", str(tmp_path / "tfds"))
  summary = evaluate.evaluate(evaluator, src, str(tmp_path / "out"), progress=False)
  assert summary["num_images"] == 2 and summary["num_failed"] == 1
  assert summary["failed"][0]["file"] == "q.jpg"
  rows = _csv(tmp_path / "out" / "per_image.csv")
  assert sorted(r["file"] for r in rows) == ["p.jpg", "r.jpg"]
  assert sorted(os.listdir(tmp_path / "out" / "fusion")) == ["p.png", "r.png"]
  assert rows[0]["hr_psnr"] == rows[1]["hr_psnr"]  # the same picture twice


def test_two_devices_give_the_same_metrics(evaluator, small_weights, folder, tmp_path):
  one = tmp_path / "one"
  evaluate.evaluate(evaluator, sources.FolderSource(str(folder)), str(one), progress=False)
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
  evaluate.evaluate(evaluator, sources.FolderSource(str(folder)), str(out), progress=False)
  assert (out / "metrics.json").exists() and (out / "per_image.csv").exists()
  with pytest.raises(_Stop):
    evaluate.evaluate(evaluator, _StoppingSource(), str(out), progress=False)
  # The previous run's results are gone (its images stay, overwritten by name next time).
  assert not (out / "metrics.json").exists() and not (out / "per_image.csv").exists()
  assert [f for f in os.listdir(out) if f.startswith(".")] == []  # no temp files either


def test_out_inside_the_data_folder_is_refused(evaluator, folder):
  for out in (folder, folder / "eval"):
    with pytest.raises(ValueError, match=f"{out} is inside the data folder {folder}"):
      evaluate.evaluate(evaluator, sources.FolderSource(str(folder)), str(out), progress=False)
  assert not (folder / "eval").exists() and not (folder / "metrics.json").exists()


def test_non_finite_outputs_give_null_means_not_a_truncated_file(evaluator, small_model, folder,
                                                                 tmp_path):
  nan = jax.tree_util.tree_map(lambda a: np.full(a.shape, np.nan, a.dtype),
                               small_model.variables)
  evaluator.set_variables(nan)  # same shapes: no recompilation
  try:
    summary = evaluate.evaluate(evaluator, sources.FolderSource(str(folder)),
                                str(tmp_path / "out"), progress=False)
  finally:
    evaluator.set_variables(small_model.variables)
  meta = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert meta == summary and meta["num_images"] == 3 and meta["num_nonfinite"] == 3
  assert meta["hr_psnr"] is None and meta["bicubic_psnr"] is not None
  assert len(_csv(tmp_path / "out" / "per_image.csv")) == 3


# --- identity, FID/KID and the report ----------------------------------------------------

@pytest.fixture(scope="module")
def metric_params(small_model):
  """IR-SE50 (random init) and pytorch-fid's InceptionV3 (synthetic weights of the real
  layout, converted as grain-jax convert --inception does)."""
  from grain_jax.nets import registry
  from test_inception import pt_inception_state_dict

  sd = {k: v.numpy() for k, v in pt_inception_state_dict().items()}
  return {"irse50": registry.init("irse50", small_model.config, 0),
          "inception": registry.from_state_dict("inception", sd, small_model.config)}


def test_identity_from_the_written_files_and_a_report_whose_links_resolve(
    small_model, metric_params, folder, tmp_path):
  from grain_jax.nets import irse50
  from test_report import check_links

  ev = Evaluator(small_model.model, small_model.variables, 2, small_model.lpips_params,
                 with_images=True, irse50_params=metric_params["irse50"],
                 inception_params=metric_params["inception"], fid_dims=64)
  out = tmp_path / "eval"
  s = evaluate.evaluate(ev, sources.FolderSource(str(folder)), str(out), progress=False,
                        with_report=True)
  assert s["num_images"] == 3 and list(s["skipped_metrics"]) == ["lr_ssim"]
  embed = jax.jit(lambda u8: irse50.identity_embedding(metric_params["irse50"],
                                                       u8 / 127.5 - 1.0))
  for row in _csv(out / "per_image.csv"):
    name = os.path.splitext(row["file"])[0] + ".png"
    e_gt = np.asarray(embed(_png(out / "gt" / name)[None]))[0]
    for key, sub in (("hr", "fusion"), ("hr_inv", "invrrdb"), ("hr_gan", "stylegan"),
                     ("bicubic", "bicubic")):
      e = np.asarray(embed(_png(out / sub / name)[None]))[0]
      want = e @ e_gt / (np.linalg.norm(e) * np.linalg.norm(e_gt))
      assert abs(float(row[f"{key}_id"]) - want) < 1e-4, (name, key)
  for k in ("hr", "hr_inv", "hr_gan", "bicubic"):  # 3 images: computed, singular covariances
    assert s[f"{k}_fid"] > 0 and np.isfinite(s[f"{k}_kid"]) and s[f"{k}_kid_std"] >= 0
  page, data = check_links(out, (out / "index.html").read_text())
  assert [r["file"] for r in data["rows"]] == ["a_exact.png", "b_large.png", "c_gray.jpg"]
  assert set(data["rows"][0]["images"]) == {"lr", "bicubic", "hr_inv", "hr_gan", "hr", "gt"}
  assert f"{s['hr_psnr']:.2f}" in (out / "index.html").read_text()


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
  """70 64x64 crops: more images than 64 feature dimensions, so FID is well conditioned."""
  d = tmp_path_factory.mktemp("crops")
  rng = np.random.default_rng(1)
  pics = [np.asarray(Image.open(SAMPLE))] + [getattr(skimage.data, n)() for n in
                                             ("coffee", "chelsea", "rocket")]
  for i in range(70):
    p = pics[i % len(pics)]
    y, x = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 96)
    Image.fromarray(p[y:y + 96:3, x:x + 96:3].repeat(2, 0).repeat(2, 1)).save(d / f"{i:02d}.png")
  return d


def test_fid_and_kid_equal_those_of_the_written_folders(small_model, metric_params, crops,
                                                        tmp_path):
  """hr_fid is `grain-jax fid OUT/fusion OUT/gt` (hence pytorch-fid's number, test_fid.py),
  and likewise for every output; with reference statistics the FID is against those."""
  from grain_jax.eval import fid

  ev = Evaluator(small_model.model, small_model.variables, 10, None, with_images=True,
                 inception_params=metric_params["inception"], fid_dims=64)
  extractor = fid.FeatureExtractor(metric_params["inception"], 64, 16)
  inputs = fid.statistics_of(str(crops), extractor, progress=False)
  npz = tmp_path / "inputs.npz"
  fid.save_statistics(str(npz), inputs["features"])
  out = tmp_path / "eval"
  s = evaluate.evaluate(ev, sources.FolderSource(str(crops)), str(out), progress=False,
                        fid_reference=fid.load_statistics(str(npz)))
  assert s["num_images"] == 70 and s["fid_reference"] == str(npz) and s["fid_dims"] == 64
  assert "hr_lpips" in s["skipped_metrics"] and "hr_id" in s["skipped_metrics"]
  gt = fid.statistics_of(str(out / "gt"), extractor, progress=False)
  # The inputs are exactly 64x64 8-bit images: the ground truth is the input, bit for bit.
  np.testing.assert_allclose(gt["features"], inputs["features"], rtol=1e-5, atol=1e-6)
  # One generated output and the baseline: every output's numbers come from the same code.
  for key, sub in (("hr", "fusion"), ("bicubic", "bicubic")):
    want = fid.fid_and_kid(fid.statistics_of(str(out / sub), extractor, progress=False), gt,
                           kid=True)
    assert abs(s[f"{key}_fid"] - want["fid"]) <= 1e-5 * want["fid"], key
    assert abs(s[f"{key}_kid"] - want["kid"]) <= 1e-4 * abs(want["kid"]), key


def test_missing_metric_weights_are_named_skipped_or_refused(small_weights, folder, tmp_path,
                                                             capsys):
  from grain_jax import cli
  from grain_jax.nets import inception

  out = tmp_path / "eval"
  code = cli.main(["evaluate", "--checkpoint", small_weights, "--data", str(folder), "--out",
                   str(out), "--lpips", "off"])
  err = capsys.readouterr().err
  assert code == 1  # the corrupt file in `folder`
  assert "FID/KID left out" in err and inception.WEIGHTS_FILE in err
  assert "identity similarity left out" in err and "--irse50" in err
  meta = json.loads((out / "metrics.json").read_text())
  assert inception.WEIGHTS_URL in meta["skipped_metrics"]["hr_fid"]
  assert meta["skipped_metrics"]["bicubic_lpips"] == "--lpips off"
  assert "--irse50" in meta["skipped_metrics"]["hr_inv_id"]
  assert "hr_fid" not in meta and "hr_id" not in meta
  code = cli.main(["evaluate", "--checkpoint", small_weights, "--data", str(folder), "--out",
                   str(tmp_path / "e4"), "--identity", "off", "--fid", "off"])
  meta = json.loads((tmp_path / "e4" / "metrics.json").read_text())
  assert meta["skipped_metrics"]["hr_id"] == "--identity off"
  assert meta["skipped_metrics"]["hr_kid"] == "--fid off"
  assert "left out" not in capsys.readouterr().err  # off: no warning
  for flag in ("--fid", "--identity"):
    code = cli.main(["evaluate", "--checkpoint", small_weights, "--data", str(folder), "--out",
                     str(tmp_path / "e2"), flag, "on"])
    assert code == 2 and "error:" in capsys.readouterr().err
  code = cli.main(["evaluate", "--checkpoint", small_weights, "--data", str(folder), "--out",
                   str(tmp_path / "e3"), "--inception", str(tmp_path / "nothing.pth")])
  err = capsys.readouterr().err
  assert code == 2 and "no such file" in err and inception.WEIGHTS_URL in err


def test_a_new_row_in_the_metric_table_reaches_every_consumer(small_weights, folder, tmp_path,
                                                              capsys, monkeypatch):
  """A per-image metric is one row of metrics.METRICS: the evaluation computes it for every
  output, per_image.csv, metrics.json, the report and the command's summary show it; the
  report names a skipped metric's reason once for all outputs."""
  import jax.numpy as jnp
  from grain_jax import cli
  from grain_jax.eval import metrics

  mae = lambda nets, a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))
  monkeypatch.setitem(metrics.METRICS, "mae", metrics.Metric("mae", mae, 3, label="MAE"))
  out = tmp_path / "eval"
  code = cli.main(["evaluate", "--checkpoint", small_weights, "--data", str(folder), "--out",
                   str(out), "--lpips", "off", "--identity", "off", "--fid", "off", "--report"])
  assert code == 1  # the corrupt file in `folder`
  assert "hr_mae" in capsys.readouterr().out
  rows = _csv(out / "per_image.csv")
  for row in rows:
    name = os.path.splitext(row["file"])[0] + ".png"
    gt = _png(out / "gt" / name)
    for key, sub in (("hr", "fusion"), ("hr_inv", "invrrdb"), ("bicubic", "bicubic")):
      want = np.mean(np.abs(_png(out / sub / name) - gt))
      assert float(row[f"{key}_mae"]) == pytest.approx(want, rel=1e-5), (name, key)
  s = json.loads((out / "metrics.json").read_text())
  assert s["hr_mae"] == pytest.approx(np.mean([float(r["hr_mae"]) for r in rows]), rel=1e-6)
  page = (out / "index.html").read_text()
  means = page.split("<h2>Means</h2>")[1]
  assert "<th>MAE</th>" in means and f"<td class=num>{s['hr_mae']:.3f}</td>" in means
  assert "<li><b>hr_lpips, hr_inv_lpips, hr_gan_lpips, bicubic_lpips</b>: --lpips off</li>" \
      in means
