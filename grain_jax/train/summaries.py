"""What a training run writes as it goes: the losses (train_metrics.jsonl, TensorBoard, the
log), the 8-panel preview grids, and the validation scalars."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax.formats import images
from grain_jax.nets.model import GRAIN
from grain_jax.train import stages
from grain_jax.train.state import variables_of
from grain_jax.train.step import batch_noise, forward
from grain_jax.util import distributed, files

log = logging.getLogger("grain_jax.train")


def image_grid(y, out: dict, lr_size: int) -> np.ndarray:
  """The original's 8 panels for the first example: gt, hr_inv, hr_gan, hr / lr and the
  differences gt - hr_inv, gt - hr_gan, gt - hr (as the original's tensor2im shows them)."""
  hr = y.shape[1]
  zero = np.zeros_like(np.asarray(y[0]))
  pick = lambda k: np.asarray(out[k][0]) if k in out else zero
  lr = np.asarray(out["lr"][0])
  lr_big = np.repeat(np.repeat(lr, hr // lr_size, 0), hr // lr_size, 1)
  gt = np.asarray(y[0])
  top = [gt, pick("hr_inv"), pick("hr_gan"), pick("hr")]
  bottom = [lr_big] + [gt - pick(k) for k in ("hr_inv", "hr_gan", "hr")]
  return images.to_uint8(np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0))


class Reporter:
  """Training losses to train_metrics.jsonl, TensorBoard and the log; preview image grids."""

  def __init__(self, cfg, workdir: str, model: GRAIN, first_step: int, mesh: Mesh):
    from tensorboardX import SummaryWriter  # deferred: it imports torch when installed (~1 s)

    self.cfg, self.workdir, self.model = cfg, workdir, model
    self.main = jax.process_index() == 0
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.main else None
    # A skipped step's NaN loss is logged on purpose; tensorboardX would warn once per value.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    self.path = os.path.join(workdir, "train_metrics.jsonl")
    if self.main and os.path.exists(self.path):
      self._truncate_log(first_step)
    stage = stages.get(cfg.stage)
    # Every process runs the preview (a jitted program over all devices); the first writes it.
    self._preview = jax.jit(lambda v, x, noise: forward(model, v, x, *noise, stage),
                            out_shardings=NamedSharding(mesh, P()))
    self._t0, self._steps = time.perf_counter(), 0

  def _truncate_log(self, first_step: int) -> None:
    """Keeps the lines up to the checkpoint we resume from; a line cut short by a kill
    mid-write is dropped (with a warning), not fatal."""
    kept, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= first_step:
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
          dropped += 1
    if dropped:
      log.warning("%s: dropped %d damaged line(s) (a run killed while writing?)", self.path,
                  dropped)
    with files.atomic_open(self.path) as f:
      f.writelines(kept)

  def step_done(self) -> None:
    self._steps += 1

  def losses(self, step: int, metrics, skipped: int) -> dict:
    m = {k: float(v) for k, v in distributed.host_copy(metrics).items()}
    m.pop("nonfinite_run", None)  # the guard's bookkeeping (nonfinite: this step skipped)
    sec = (time.perf_counter() - self._t0) / max(self._steps, 1)
    self._t0, self._steps = time.perf_counter(), 0
    if self.writer:
      for k, v in m.items():
        self.writer.add_scalar(f"train/{k}", v, step)
      self.writer.add_scalar("train/seconds_per_step", sec, step)
      self.writer.add_scalar("train/skipped_examples", skipped, step)
    # The guard's counts only once a step was skipped: a healthy run's lines stay short.
    shown = {k: v for k, v in m.items() if m.get("nonfinite_total") or not k.startswith("nonf")}
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    if self.main:
      # JSON has no NaN: a non-finite loss is logged as null.
      row = {k: (v if np.isfinite(v) else None) for k, v in m.items()}
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **row}) + "\n")
    return m

  def preview(self, step: int, state, host_batch) -> None:
    # The first example of the first host's batch, the same on every host.
    x = distributed.broadcast_from_first(np.asarray(host_batch["x"][:1]))
    y = distributed.broadcast_from_first(np.asarray(host_batch["y"][:1]))
    noise = batch_noise(jax.random.key(0), 1, self.model, None)
    out = distributed.host_copy(self._preview(variables_of(state), x, noise))
    if not self.writer:
      return
    grid = image_grid(y, out, self.model.lr_size)
    self.writer.add_image("train/images", grid, step, dataformats="HWC")
    images.write_png(os.path.join(self.workdir, "images", f"{step:07d}.png"), grid)

  def validation(self, step: int, metrics: dict, names) -> None:
    if self.writer:
      for k in names:
        if metrics[k] is not None:  # None: no finite value (evaluate's null)
          self.writer.add_scalar(f"eval/{k}", metrics[k], step)

  def close(self) -> None:
    if self.writer:
      self.writer.close()
