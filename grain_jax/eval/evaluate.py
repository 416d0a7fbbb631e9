"""Batch evaluation: downscale -> 8-bit LR -> upscale over a dataset, with metrics and images.

`evaluate` runs an Evaluator (evaluator.py: the jitted, data-parallel step of a GRAIN model
and its variables) over a source (data/sources.py) and writes OUT/metrics.json (means and set
metrics), OUT/per_image.csv (one row per image), with images the folders lr/, bicubic/,
invrrdb/, stylegan/, fusion/, gt/ and comp/ (panels side by side), and with a report
OUT/index.html (report.py). `run` is the `grain-jax evaluate` command.

Each image is center-cropped to a square and resized to the model's HR size if needed
(antialiased bicubic), then:
  hr, hr_inv, hr_gan, bicubic   PSNR / SSIM / LPIPS against the input (8-bit RGB, see metrics.py),
                                identity similarity `_id` (cosine of IR-SE50 embeddings, as
                                GRAIN's identity loss crops and resizes), and over the set
                                FID `_fid` and KID `_kid` (pytorch-fid's InceptionV3 features of
                                the 8-bit images; against the inputs or reference statistics)
  lr                            PSNR of GRAIN's LR against a bicubic 8-bit downscale of the input
  bicubic                       the plain baseline: bicubic down to an 8-bit LR, bicubic up
A metric whose network has no weights is left out and named, with the reason, in
metrics.json's `skipped_metrics`.
Batches are split across all local devices by a jitted step on a ("data",) mesh; the last
batch is padded and the padding dropped. Files are read, decoded and written by background
threads while the devices compute, and the step compiles once. In a multi-process run
(util/distributed.py) each process evaluates a contiguous share of the images on its own
devices; every process then holds all rows, and process 0 writes the results.
"""
from __future__ import annotations

import concurrent.futures
import csv
import os
import sys
import time
import warnings

import jax
import numpy as np
import scipy.linalg
from jax.experimental import multihost_utils
from tqdm import tqdm

from grain_jax import inference
from grain_jax.data import sources
from grain_jax.eval import metrics
from grain_jax.eval.evaluator import Evaluator, available_metric_networks, metric_networks
from grain_jax.eval.fid import fid_and_kid, load_statistics, statistics
from grain_jax.eval.report import COLUMNS, comparison_grid, write_report, write_thumbnail
from grain_jax.formats import images
from grain_jax.util import files, prefetch
from grain_jax.util.progress import progress_bar

FOLDERS = {key: folder for key, folder, _ in COLUMNS}  # image key -> folder under OUT
CONVENTIONS = ("8-bit RGB, data range 255; SSIM 11x11 Gaussian (sigma 1.5), channel mean; "
               "LPIPS AlexNet v0.1 on the 8-bit images; bicubic = antialiased Keys a=-0.5; "
               "id = cosine of IR-SE50 embeddings (GRAIN's identity-loss crop); FID/KID on "
               "pytorch-fid's InceptionV3 features of the 8-bit images, FID as pytorch-fid, "
               "KID as torch-fidelity (polynomial kernel, 100 subsets)")


def save_images(out_dir: str, name: str, res: dict[str, np.ndarray],
                thumbnails: bool = False, psnrs: dict | None = None) -> None:
  """One image's outputs (those that were computed) in the original test script's folders
  (lr/, invrrdb/, stylegan/, fusion/) and bicubic/, gt/; comp/ holds the labelled panels of
  report.comparison_grid (with `psnrs`, {output: dB}, under them). thumbnails: also the
  report's thumbnails."""
  panels = {}
  for key, folder in FOLDERS.items():
    if f"img_{key}" in res:
      panels[key] = res[f"img_{key}"]
      images.write_png(os.path.join(out_dir, folder, name), panels[key])
      if thumbnails:
        write_thumbnail(out_dir, folder, name, panels[key])
  images.write_png(os.path.join(out_dir, "comp", name),
                   comparison_grid([panels], psnrs=[psnrs] if psnrs else None))


class _PngNames:
  """Items' names as PNG file names, made unique if two items share one."""

  def __init__(self):
    self.written = set()

  def __call__(self, name: str) -> str:
    stem = os.path.splitext(name)[0]
    out, k = stem + ".png", 1
    while out in self.written:
      out, k = f"{stem}_{k}.png", k + 1
    self.written.add(out)
    return out


def _run(ev: Evaluator, source, indices, workers: int, report, on_batch, bar) -> None:
  """Feeds the items `indices` of `source` to `ev` in batches; on_batch(host_outputs, names,
  indices) for each, in order, while the next batch computes."""
  hr = ev.hr_size

  def load(i):
    img, note = source.load(i)
    return images.to_model(images.resize_square(img, hr)), note, img.shape[:2], source.name(i)

  def on_error(i, err):
    report.fail(source.name(i), err)
    bar.update(1)

  pending = None
  stream = prefetch.prefetch(load, indices, workers=workers, depth=2 * ev.batch_size + workers)
  for group in prefetch.batches(stream, ev.batch_size, on_error):
    for _, (_, note, shape, name) in group:  # the name too is read in the background (TFDS)
      report.note(name, note)
      if shape != (hr, hr):
        report.resized(name, shape, hr)
    # A last partial batch is padded with zeros; on_batch keeps only the named rows.
    outputs = ev(prefetch.pad_batch([res[0] for _, res in group], ev.batch_size))
    if pending:  # `outputs` is dispatched and runs while the previous batch is fetched
      on_batch(jax.device_get(pending[0]), *pending[1:])
    pending = (outputs, [res[3] for _, res in group], [i for i, _ in group])
  if pending:
    on_batch(jax.device_get(pending[0]), *pending[1:])


def _share(n: int) -> range:
  """This process's contiguous part of n items (all of them in a single-process run)."""
  per = -(-n // jax.process_count())
  return range(min(n, jax.process_index() * per), min(n, (jax.process_index() + 1) * per))


def _gather(ev: Evaluator, source, n: int, mine: dict, features: dict,
            report) -> tuple[list[dict], dict]:
  """Every process's rows and FID features, in item order, on every process (a multi-process
  run splits the items over the hosts). Items another host could not read join
  report.failed."""
  per = -(-n // jax.process_count())
  lo = jax.process_index() * per
  values = np.zeros((per, len(ev.names)), np.float32)  # the device computed float32
  valid = np.zeros((per,), np.int32)
  feats = {k: np.zeros((per, ev.fid_dims), np.float32) for k in features}
  for i, row in mine.items():
    values[i - lo] = [row[k] for k in ev.names]
    valid[i - lo] = 1
    for k in features:
      feats[k][i - lo] = features[k][i]
  values, valid, resized = (np.asarray(multihost_utils.process_allgather(a)) for a in
                            (values, valid, np.int32(report.counts["resized"])))
  feats = {k: np.asarray(multihost_utils.process_allgather(a)) for k, a in feats.items()}
  report.counts["resized"] = int(resized.sum())
  rows, keep = [], []
  for p in range(jax.process_count()):
    for j in range(per):
      i = p * per + j
      if i >= n:
        break
      if valid[p, j]:
        rows.append({"file": source.name(i), **dict(zip(ev.names, map(float, values[p, j])))})
        keep.append(p * per + j)
      elif p != jax.process_index():
        report.failed.append({"file": source.name(i), "error": f"unreadable (see the log of "
                                                                f"process {p})"})
  return rows, {k: a.reshape(-1, ev.fid_dims)[keep] for k, a in feats.items()}


def set_metrics(ev: Evaluator, features: dict, reference: dict | None = None) -> tuple[dict,
                                                                                      dict]:
  """FID and KID of each output's features against the ground truth's (or `reference`:
  {'mu', 'sigma'[, 'features']}, e.g. fid.load_statistics); returns (metrics, skipped).

  KID uses torch-fidelity's defaults, with subsets of min(1000, set size) images."""
  if not ev.with_fid:
    return {}, {}
  n = len(features.get("gt", ()))
  keys = [f"{k}_{m}" for k in ev.set_outputs for m in ("fid", "kid")]
  if n < 2:
    return {}, dict.fromkeys(keys, f"FID and KID need at least 2 images; {n} evaluated")
  real = reference or {"features": features["gt"]}
  if "mu" not in real:
    real["mu"], real["sigma"] = statistics(real["features"])
  if n <= ev.fid_dims:
    print(f"note: FID of {n} images in {ev.fid_dims} dimensions: the covariances are "
          f"singular and FID is biased upward for small sets; compare FIDs of equal set sizes "
          f"only, or use KID", file=sys.stderr)
  res, skipped = {}, {}
  for k in ev.set_outputs:
    mu, sigma = statistics(features[k])
    with warnings.catch_warnings():  # scipy's singular-matrix warning: the note above says it
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      d = fid_and_kid({"mu": mu, "sigma": sigma, "features": features[k]}, real,
                      kid="features" in real)
    res[f"{k}_fid"] = d["fid"]
    if "kid" in d:
      res[f"{k}_kid"], res[f"{k}_kid_std"] = d["kid"], d["kid_std"]
    else:
      skipped[f"{k}_kid"] = "the reference statistics hold no features (KID needs them)"
  return res, skipped


RESULTS = ("metrics.json", "per_image.csv")  # what a run writes besides the image folders


def summarize(ev: Evaluator, rows: list[dict], report, source, seconds: float,
              set_values: dict | None = None, skipped: dict | None = None) -> dict:
  """metrics.json: the mean of each metric, the set metrics (FID, KID), failures, the metrics
  left out and why, and how the numbers were made.

  A mean that is not finite (NaN outputs, e.g. of diverged weights) is null: JSON has no NaN.
  `num_nonfinite` counts the images with any non-finite metric.
  """
  summary = {"num_images": len(rows), "num_failed": len(report.failed)}
  for k in ev.names:
    mean = float(np.mean([r[k] for r in rows])) if rows else None
    summary[k] = mean if mean is not None and np.isfinite(mean) else None
  for k, v in (set_values or {}).items():
    summary[k] = v if np.isfinite(v) else None
  summary["num_nonfinite"] = sum(not all(np.isfinite(r[k]) for k in ev.names) for r in rows)
  summary.update(
      skipped_metrics={**ev.skipped, **(skipped or {})},
      num_resized=report.counts["resized"], failed=report.failed,
      data=getattr(source, "description", ""), hr_size=ev.hr_size, lr_size=ev.lr_size,
      batch_size=ev.batch_size, devices=len(ev.mesh.devices.flat), seconds=round(seconds, 3),
      images_per_s=round(len(rows) / seconds, 4) if seconds else None,
      compile_seconds=round(ev.compile_seconds, 3), conventions=CONVENTIONS)
  return summary


def _data_folders(source) -> list[str]:
  """The folders a folder source searches (none for TFDS)."""
  return [d for d in getattr(source, "inputs", []) if os.path.isdir(d)]


def check_output(source, out_dir: str, create: bool = False) -> str:
  """Before any work: refuses an `out_dir` that is, or lies inside, a data folder of `source`
  (a second run would evaluate the first one's images), and one that cannot be written.
  create=False checks without creating anything. Returns the absolute path."""
  out_dir = os.path.abspath(out_dir)
  for folder in _data_folders(source):
    if files.inside(out_dir, folder):
      raise ValueError(f"output folder {out_dir} is inside the data folder "
                       f"{os.path.abspath(folder)}: a later run would evaluate these outputs; "
                       f"choose an --out outside it")
  return files.check_writable(out_dir) if create else files.check_can_create(out_dir)


def evaluate(ev: Evaluator, source, out_dir: str, workers: int = 4,
             max_images: int | None = None, progress: bool = True,
             fid_reference: dict | None = None, with_report: bool = False) -> dict:
  """Runs `ev` on every image of `source`; writes metrics.json, per_image.csv and, if `ev`
  returns images, the image folders (and with_report the thumbnails and index.html).
  Returns the metrics.json content. FID/KID (if `ev` computes features) are against the
  inputs, or against `fid_reference` statistics ({'mu', 'sigma'[, 'features']}).

  Unreadable images are reported, counted in `num_failed` and skipped; the rest are evaluated.
  `out_dir` must be writable and outside the data folders (check_output). A previous run's
  metrics.json and per_image.csv are removed first, and the new ones written atomically, so
  a stopped run never leaves older results looking current, nor half a file.
  """
  if with_report and not ev.with_images:
    raise ValueError("a report needs the images: make the Evaluator with with_images=True")
  if with_report and jax.process_count() > 1:
    raise ValueError("--report is for single-process evaluation (the page lists one "
                     "process's image files); rerun with one process")
  out_dir = check_output(source, out_dir, create=True)
  main = jax.process_index() == 0  # the one writer of the results of a multi-process run
  for name in RESULTS:
    if main and os.path.isfile(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  n = len(source) if max_images is None else min(len(source), max_images)
  mine_range = _share(n)
  bar = progress_bar(len(mine_range), "evaluate", "img", progress)
  report = prefetch.Report(lambda s: tqdm.write(s, file=sys.stderr))
  mine, writes, png_name, png_names = {}, [], _PngNames(), {}
  features = {k: {} for k in ev.set_outputs + ("gt",)} if ev.with_fid else {}
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers // 2)) as writer:
    def on_batch(host, names, indices):
      for j, (name, i) in enumerate(zip(names, indices)):
        mine[i] = {"file": name, **{k: float(host[k][j]) for k in ev.names}}
        for k in features:
          features[k][i] = host[f"features_{k}"][j]
        if ev.with_images:
          png_names[i] = png_name(name)
          writes.append(writer.submit(
              save_images, out_dir, png_names[i],
              {k: v[j] for k, v in host.items() if k.startswith("img_")}, with_report,
              {k: mine[i][f"{k}_psnr"] for k in ev.outputs + ("bicubic",)}))
      bar.update(len(names))

    _run(ev, source, mine_range, workers, report, on_batch, bar)
    for w in writes:
      w.result()  # a write error (disk full, permissions) is raised, not swallowed
  bar.close()
  if jax.process_count() > 1:
    rows, features = _gather(ev, source, n, mine, features, report)
  else:
    rows = [mine[i] for i in sorted(mine)]
    features = {k: np.stack([f[i] for i in sorted(f)]) if f else np.zeros((0, ev.fid_dims))
                for k, f in features.items()}
  set_values, set_skipped = set_metrics(ev, features, fid_reference)
  summary = summarize(ev, rows, report, source, time.perf_counter() - t0, set_values,
                      set_skipped)
  if ev.with_fid:
    summary.update(fid_dims=ev.fid_dims, fid_reference=(fid_reference or {}).get(
        "path", "statistics given" if fid_reference else "the input images"))
  if not main:
    return summary
  # per_image.csv first: metrics.json, the summary, appears only once everything is written.
  with files.atomic_open(os.path.join(out_dir, "per_image.csv"), newline="") as f:
    w = csv.DictWriter(f, ["file"] + ev.names)
    w.writeheader()
    w.writerows(rows)
  files.write_json(os.path.join(out_dir, "metrics.json"), summary)
  if with_report:
    write_report(out_dir, summary, rows, [png_names[i] for i in sorted(png_names)])
  return summary



def run(checkpoint: str, data: str, out_dir: str, data_dir: str | None = None,
        batch_size: int = 0, save_images: bool = False, with_report: bool = False,
        lpips: str = "auto", identity: str = "auto", fid: str = "auto",
        inception_source: str | None = None, fid_dims: int = 2048,
        fid_reference: str | None = None, max_images: int | None = None, workers: int = 4,
        compute_dtype: str = "float32") -> dict:
  """`grain-jax evaluate`: the data and `out_dir` are checked (and the --fid_reference
  statistics read) before the model is loaded; then the evaluation, its summary printed.
  lpips, identity and fid are 'auto', 'on' or 'off' (evaluator.metric_networks). Returns
  metrics.json's content."""
  source = sources.open_source(data, data_dir)
  if len(source) == 0:
    raise ValueError(f"no images in {data}")
  check_output(source, out_dir)
  reference = (load_statistics(fid_reference, fid_dims)
               if fid_reference and fid != "off" else None)
  loaded = inference.load(checkpoint, compute_dtype)
  networks = metric_networks(available_metric_networks(loaded), identity, fid,
                             inception_source, lpips)
  ev = Evaluator(loaded.model, loaded.variables, batch_size or None,
                 with_images=save_images or with_report, fid_dims=fid_dims, **networks)
  s = evaluate(ev, source, out_dir, workers, max_images, fid_reference=reference,
               with_report=with_report)
  show = [k for k in [f"{o}_{m}" for o in ("hr", "bicubic") for m in metrics.METRICS]
          + ["lr_psnr"] if s.get(k) is not None]
  print(f"{s['num_images']} images ({s['num_failed']} failed) in {s['seconds']:.1f} s: "
        + ", ".join(f"{k} {s[k]:.4f}" for k in show))
  out_dir = os.path.abspath(out_dir)
  if with_report:
    print(f"report: {os.path.join(out_dir, 'index.html')}")
  if s["num_nonfinite"]:
    print(f"warning: {s['num_nonfinite']} images gave non-finite metrics (NaN outputs?); "
          f"their means are null in metrics.json", file=sys.stderr)
  print(f"wrote {os.path.join(out_dir, 'metrics.json')} and per_image.csv")
  return s
