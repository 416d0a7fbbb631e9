"""The quick start, the CPU demo of training (`grain-jax train --config demo`, whose config
is grain_jax/configs/demo.py): data from scikit-image, the four stages as a pipeline
(pipeline.py), a final evaluation on held-out crops against the bicubic baseline.

With `pipeline.budget_s` > 0 the whole demo (data, four stages, evaluation) takes about that
long on any machine (the pipeline keeps `budget_reserve_s` for the evaluation). The steps
each stage ran are printed and recorded in metrics.json, with the command that reruns them
as fixed step counts.
"""
from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import skimage.data
from PIL import Image

from grain_jax import inference
from grain_jax.data.sources import FolderSource
from grain_jax.eval.evaluate import evaluate
from grain_jax.eval.evaluator import Evaluator, available_metric_networks, lpips_variables
from grain_jax.eval.report import COLUMNS, comparison_grid
from grain_jax.formats import images
from grain_jax.formats.weights import read_meta, weights_dir
from grain_jax.train import pipeline
from grain_jax.train.config import check_pipeline
from grain_jax.util import files, runs


def prepare_data(cfg, root: str) -> tuple[str, str]:
  """Writes the training pictures and the held-out crops under root/; returns both folders."""
  hr = int(cfg.model.hr_size)
  train, heldout = os.path.join(root, "train"), os.path.join(root, "heldout")
  if os.path.isdir(heldout) and os.listdir(heldout):
    return train, heldout  # made by an earlier (interrupted) run of the same demo
  tmp = heldout + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  for name in cfg.demo.train_images:
    img, _ = images.decode_array(getattr(skimage.data, name)())
    if max(img.shape[:2]) > 512:  # smaller files decode faster; crops are small anyway
      f = 512 / max(img.shape[:2])
      img = images.resize_to(img, round(img.shape[0] * f), round(img.shape[1] * f))
    images.write_png(os.path.join(train, f"{name}.png"), images.to_uint8(images.to_model(img)))
  for name in cfg.demo.heldout_images:
    img, _ = images.decode_array(getattr(skimage.data, name)())
    h, w = img.shape[:2]
    s = cfg.demo.heldout_scale
    img = images.resize_to(img, max(hr, round(h * s)), max(hr, round(w * s)))
    for i in range(img.shape[0] // hr):
      for j in range(img.shape[1] // hr):
        crop = img[i * hr:(i + 1) * hr, j * hr:(j + 1) * hr]
        images.write_png(os.path.join(tmp, f"{name}_{i}_{j}.png"),
                         images.to_uint8(images.to_model(crop)))
  os.rename(tmp, heldout)
  return train, heldout


def comparison(eval_dir: str, out_path: str, untrained_prior: bool, n: int = 4,
               scale: int = 3) -> None:
  """One row per held-out picture (its first crop; up to n): LR (nearest) | bicubic |
  hr_inv | hr_gan | hr | ground truth, enlarged `scale` times, with each panel's PSNR;
  hr_gan is labelled as coming from an untrained prior if it does. Made from the final
  evaluation's images and per_image.csv (nothing is computed twice)."""
  with open(os.path.join(eval_dir, "per_image.csv"), newline="") as f:
    first = {}  # crops are named PICTURE_i_j.png
    for row in csv.DictReader(f):
      first.setdefault(row["file"].rsplit("_", 2)[0], row)
  panels, psnrs = [], []
  for row in list(first.values())[:n]:
    png = os.path.splitext(row["file"])[0] + ".png"
    panels.append({key: np.asarray(Image.open(os.path.join(eval_dir, folder, png)).convert("RGB"))
                   for key, folder, _ in COLUMNS})
    psnrs.append({k: float(row[f"{k}_psnr"]) for k in ("bicubic", "hr_inv", "hr_gan", "hr")})
  images.write_png(out_path, comparison_grid(
      panels, scale, psnrs, {"hr_gan": "untrained prior"} if untrained_prior else None))


def run(cfg, workdir: str, progress: bool = True) -> dict:
  """Trains the four stages in WORKDIR/stage*_NAME, evaluates, writes metrics.json and
  comparison.png; returns the metrics. The workdir is locked while the demo runs; a rerun
  skips the stages an earlier one finished."""
  t0 = runs.clock()
  check_pipeline(cfg)
  workdir = files.check_writable(workdir, "workdir")
  with runs.locked(workdir, "demo run"):
    return _run(cfg, workdir, progress, t0)


def _run(cfg, workdir: str, progress: bool, t0: float) -> dict:
  train, heldout = prepare_data(cfg, os.path.join(workdir, "data"))
  cfg = cfg.copy_and_resolve_references()
  cfg.data.train = train
  ran = pipeline.train_stages(cfg, workdir, progress, started=t0)
  previous = os.path.join(workdir, ran[-1]["workdir"])
  loaded = inference.load(previous)
  lpips = lpips_variables("auto", available_metric_networks(loaded))
  ev = Evaluator(loaded.model, loaded.variables, None, lpips, with_images=True,
                 skip_reasons={"id": "no IR-SE50 weights in the demo",
                               "fid": "no InceptionV3 weights in the demo"})
  m = evaluate(ev, FolderSource(heldout), os.path.join(workdir, "eval"), progress=False)
  # The generator is never trained by the demo: it is random unless init.weights has one.
  untrained = not (cfg.init.weights and "generator" in read_meta(
      weights_dir(cfg.init.weights))["networks"])
  comparison(os.path.join(workdir, "eval"), os.path.join(workdir, "comparison.png"),
             untrained)
  seconds = runs.clock() - t0
  m = dict(m, demo_seconds=round(seconds, 1), demo_budget_s=cfg.pipeline.budget_s, stages=ran,
           rerun=("grain-jax train --config demo --workdir WORKDIR --config.pipeline.budget_s=0 "
                  + " ".join(f"--config.pipeline.steps.{r['stage']}={r['steps']}"
                             for r in ran)))
  files.write_json(os.path.join(workdir, "metrics.json"), m)
  hr, lr = loaded.hr_size, loaded.lr_size
  print(f"demo finished in {seconds / 60:.1f} min; {m['num_images']} held-out {hr}x{hr} crops "
        f"via {lr}x{lr} 8-bit LR:")
  print(f"  GRAIN    hr PSNR {m['hr_psnr']:.2f} dB  SSIM {m['hr_ssim']:.4f}  "
        f"(hr_inv {m['hr_inv_psnr']:.2f} dB, SSIM {m['hr_inv_ssim']:.4f})")
  print(f"  bicubic     PSNR {m['bicubic_psnr']:.2f} dB  SSIM {m['bicubic_ssim']:.4f}  "
        f"(GRAIN {m['hr_psnr'] - m['bicubic_psnr']:+.2f} dB)")
  print(f"wrote {os.path.join(workdir, 'metrics.json')}")
  print(f"picture: {os.path.join(workdir, 'comparison.png')} (LR | bicubic | hr_inv | hr_gan | "
        f"hr | ground truth, one held-out picture per row)")
  return m
