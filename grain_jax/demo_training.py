"""The CPU demo (`grain-jax train --config demo`, grain_jax/configs/demo.py): data from
scikit-image, the four stages in turn, a final evaluation on held-out crops against the
bicubic baseline."""
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


def stage_config(cfg, stage: str, train: str, heldout: str, previous: str):
  """The demo's config for one stage: that stage's recipe, the demo's data, steps, losses."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.stage = stage
  c.max_steps = cfg.stage_steps[stage]
  c.learning_rate = cfg.stage_learning_rate[stage]
  c.d_every = stages.get(stage).d_every
  c.loss.update(cfg.stage_loss[stage])
  c.data.train = train
  c.data.eval = heldout if stage in cfg.validate_stages else ""
  c.init.previous_workdir = previous
  return c


def comparison(loaded, heldout: str, out_path: str, n: int = 4) -> None:
  """Rows of held-out crops: input | bicubic baseline | hr_inv | hr_gan | hr."""
  from grain_jax import datasets, metrics

  src = datasets.FolderSource(heldout)
  x = np.stack([images.to_model(src.load(i)[0]) for i in range(min(n, len(src)))])
  out = loaded.upscale(loaded.downscale(x))
  cols = [x, np.asarray(metrics.bicubic_baseline(x, loaded.lr_size)[1])]
  cols += [np.asarray(out[k]) for k in ("hr_inv", "hr_gan", "hr")]
  rows = [np.concatenate([images.to_uint8(c[i]) for c in cols], 1) for i in range(len(x))]
  images.write_png(out_path, np.concatenate(rows, 0))


def run(cfg, workdir: str, progress: bool = True) -> dict:
  """Trains the four stages in WORKDIR/stage*_NAME, evaluates, writes metrics.json and
  comparison.png; returns the metrics. The workdir is locked while the demo runs."""
  t0 = time.perf_counter()
  workdir = files.check_writable(workdir, "workdir")
  with files.WorkdirLock(workdir, "demo run"):
    return _run(cfg, workdir, progress, t0)


def _run(cfg, workdir: str, progress: bool, t0: float) -> dict:
  from grain_jax import datasets, evaluate, inference, trainer

  train, heldout = prepare_data(cfg, os.path.join(workdir, "data"))
  previous = ""
  for k, stage in enumerate(cfg.stages, 1):
    stage_dir = os.path.join(workdir, f"stage{k}_{stage}")
    log.info("stage %d/%d: %s (%d steps)", k, len(cfg.stages), stage, cfg.stage_steps[stage])
    m = trainer.train_and_evaluate(stage_config(cfg, stage, train, heldout, previous),
                                   stage_dir, progress)
    out = stages.get(stage).output
    if m:
      log.info("stage %s: held-out %s PSNR %.2f dB (bicubic %.2f dB)", stage, out,
               m[f"{out}_psnr"], m["bicubic_psnr"])
    previous = stage_dir
  loaded = inference.load(previous)
  ev = evaluate.Evaluator(loaded.model, loaded.variables, None,
                          evaluate.lpips_variables("auto", loaded))
  m = evaluate.evaluate(ev, datasets.FolderSource(heldout), os.path.join(workdir, "eval"),
                        progress=False)
  files.write_json(os.path.join(workdir, "metrics.json"), m)
  comparison(loaded, heldout, os.path.join(workdir, "comparison.png"))
  minutes = (time.perf_counter() - t0) / 60
  hr, lr = loaded.hr_size, loaded.lr_size
  print(f"demo finished in {minutes:.1f} min; {m['num_images']} held-out {hr}x{hr} crops via "
        f"{lr}x{lr} 8-bit LR:")
  print(f"  GRAIN    hr PSNR {m['hr_psnr']:.2f} dB  SSIM {m['hr_ssim']:.4f}")
  print(f"  bicubic     PSNR {m['bicubic_psnr']:.2f} dB  SSIM {m['bicubic_ssim']:.4f}  "
        f"(GRAIN {m['hr_psnr'] - m['bicubic_psnr']:+.2f} dB)")
  print(f"wrote {os.path.join(workdir, 'metrics.json')} and "
        f"{os.path.join(workdir, 'comparison.png')}")
  return m
