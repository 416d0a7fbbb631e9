"""The CPU demo (`grain-jax train --config demo`, grain_jax/configs/demo.py): data from
scikit-image, the four stages in turn, a final evaluation on held-out crops against the
bicubic baseline.

With `demo_budget_s` > 0 the whole demo (data, four stages, evaluation) takes about that
long on any machine: before each stage, what is left of the budget (less a reserve for the
evaluation) is split among the remaining stages by `stage_budget_share`, and the stage trains
for as many steps as fit (trainer.time_budget_s). The steps each stage ran are printed and
recorded in metrics.json, with the command that reruns them as fixed step counts.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import ml_collections
import numpy as np

from grain_jax import files, images, stages

log = logging.getLogger("grain_jax.demo")


def prepare_data(cfg, root: str) -> tuple[str, str]:
  """Writes the training pictures and the held-out crops under root/; returns both folders."""
  import skimage.data

  hr = int(cfg.model.hr_size)
  train, heldout = os.path.join(root, "train"), os.path.join(root, "heldout")
  if os.path.isdir(heldout) and os.listdir(heldout):
    return train, heldout  # made by an earlier (interrupted) run of the same demo
  tmp = heldout + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  for name in cfg.demo_train_images:
    img, _ = images.decode_array(getattr(skimage.data, name)())
    if max(img.shape[:2]) > 512:  # smaller files decode faster; crops are small anyway
      f = 512 / max(img.shape[:2])
      img = images.resize_to(img, round(img.shape[0] * f), round(img.shape[1] * f))
    images.write_png(os.path.join(train, f"{name}.png"), images.to_uint8(images.to_model(img)))
  for name in cfg.demo_heldout_images:
    img, _ = images.decode_array(getattr(skimage.data, name)())
    h, w = img.shape[:2]
    s = cfg.demo_heldout_scale
    img = images.resize_to(img, max(hr, round(h * s)), max(hr, round(w * s)))
    for i in range(img.shape[0] // hr):
      for j in range(img.shape[1] // hr):
        crop = img[i * hr:(i + 1) * hr, j * hr:(j + 1) * hr]
        images.write_png(os.path.join(tmp, f"{name}_{i}_{j}.png"),
                         images.to_uint8(images.to_model(crop)))
  os.rename(tmp, heldout)
  return train, heldout


def stage_config(cfg, stage: str, train: str, heldout: str, previous: str,
                 budget_s: float = 0.0):
  """The demo's config for one stage: that stage's recipe, the demo's data, steps (or a time
  budget, with max_steps as a cap), losses."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.stage = stage
  c.max_steps = cfg.stage_max_steps if budget_s > 0 else cfg.stage_steps[stage]
  c.time_budget_s = budget_s
  c.learning_rate = cfg.stage_learning_rate[stage]
  c.d_every = stages.get(stage).d_every
  c.loss.update(cfg.stage_loss[stage])
  c.data.train = train
  c.data.eval = heldout if stage in cfg.validate_stages else ""
  c.init.previous_workdir = previous
  return c


def comparison(eval_dir: str, out_path: str, untrained_prior: bool, n: int = 4,
               scale: int = 3) -> None:
  """One row per held-out picture (its first crop; up to n): LR (nearest) | bicubic |
  hr_inv | hr_gan | hr | ground truth, enlarged `scale` times, with each panel's PSNR;
  hr_gan is labelled as coming from an untrained prior if it does. Made from the final
  evaluation's images and per_image.csv (nothing is computed twice)."""
  import csv

  from PIL import Image

  from grain_jax import report

  with open(os.path.join(eval_dir, "per_image.csv"), newline="") as f:
    first = {}  # crops are named PICTURE_i_j.png
    for row in csv.DictReader(f):
      first.setdefault(row["file"].rsplit("_", 2)[0], row)
  panels, psnrs = [], []
  for row in list(first.values())[:n]:
    png = os.path.splitext(row["file"])[0] + ".png"
    panels.append({key: np.asarray(Image.open(os.path.join(eval_dir, folder, png)).convert("RGB"))
                   for key, folder, _ in report.COLUMNS})
    psnrs.append({k: float(row[f"{k}_psnr"]) for k in ("bicubic", "hr_inv", "hr_gan", "hr")})
  images.write_png(out_path, report.comparison_grid(
      panels, scale, psnrs, {"hr_gan": "untrained prior"} if untrained_prior else None))


def run(cfg, workdir: str, progress: bool = True) -> dict:
  """Trains the four stages in WORKDIR/stage*_NAME, evaluates, writes metrics.json and
  comparison.png; returns the metrics. The workdir is locked while the demo runs."""
  t0 = time.perf_counter()
  workdir = files.check_writable(workdir, "workdir")
  with files.WorkdirLock(workdir, "demo run"):
    return _run(cfg, workdir, progress, t0)


def _stage_budget(cfg, t0: float, stage: str, remaining_stages) -> float:
  """This stage's seconds: its share of what is left of the demo's budget (0: fixed steps)."""
  if cfg.demo_budget_s <= 0:
    return 0.0
  left = t0 + cfg.demo_budget_s - cfg.demo_eval_reserve_s - time.perf_counter()
  shares = [cfg.stage_budget_share[s] for s in remaining_stages]
  return max(1.0, left * cfg.stage_budget_share[stage] / sum(shares))


def _run(cfg, workdir: str, progress: bool, t0: float) -> dict:
  from grain_jax import datasets, evaluate, inference, trainer, weights

  train, heldout = prepare_data(cfg, os.path.join(workdir, "data"))
  previous, ran = "", []
  for k, stage in enumerate(cfg.stages, 1):
    stage_dir = os.path.join(workdir, f"stage{k}_{stage}")
    budget = _stage_budget(cfg, t0, stage, cfg.stages[k - 1:])
    log.info("stage %d/%d: %s (%s)", k, len(cfg.stages), stage,
             f"{budget:.0f} s budget" if budget else f"{cfg.stage_steps[stage]} steps")
    t = time.perf_counter()
    m = trainer.train_and_evaluate(
        stage_config(cfg, stage, train, heldout, previous, budget), stage_dir, progress,
        started=trainer.clock())
    steps = weights.read_meta(os.path.join(stage_dir, "weights"))["sources"]["trained_steps"]
    ran.append({"stage": stage, "steps": steps, "seconds": round(time.perf_counter() - t, 1)})
    print(f"stage {k}/{len(cfg.stages)} {stage}: {steps} steps in {ran[-1]['seconds']:.0f} s",
          flush=True)
    out = stages.get(stage).output
    if m:
      log.info("stage %s: held-out %s PSNR %.2f dB (bicubic %.2f dB)", stage, out,
               m[f"{out}_psnr"], m["bicubic_psnr"])
    previous = stage_dir
  loaded = inference.load(previous)
  lpips = evaluate.lpips_variables("auto", evaluate.available_metric_networks(loaded))
  ev = evaluate.Evaluator(loaded.model, loaded.variables, None, lpips, with_images=True,
                          skip_reasons={"id": "no IR-SE50 weights in the demo",
                                        "fid": "no InceptionV3 weights in the demo"})
  m = evaluate.evaluate(ev, datasets.FolderSource(heldout), os.path.join(workdir, "eval"),
                        progress=False)
  # The generator is never trained by the demo: it is random unless init.weights has one.
  untrained = not (cfg.init.weights and "generator" in weights.read_meta(
      inference.weights_dir(cfg.init.weights))["networks"])
  comparison(os.path.join(workdir, "eval"), os.path.join(workdir, "comparison.png"),
             untrained)
  seconds = time.perf_counter() - t0
  m = dict(m, demo_seconds=round(seconds, 1), demo_budget_s=cfg.demo_budget_s, stages=ran,
           rerun=("grain-jax train --config demo --workdir WORKDIR --config.demo_budget_s=0 "
                  + " ".join(f"--config.stage_steps.{r['stage']}={r['steps']}" for r in ran)))
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
