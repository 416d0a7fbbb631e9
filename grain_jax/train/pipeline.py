"""Trains GRAIN's stages in sequence, each in WORKDIR/stageK_NAME starting from the previous
one's result:

    grain-jax pipeline --config grain1024 --workdir runs/grain1024 \\
        --config.data.train=/data/celeba_hq/train --config.init.weights=weights/grain1024

--config.FIELD=VALUE sets a training field of every stage (fields that are each stage's own,
learning_rate, d_every, loss.lr_l2, are -1: the stage's recipe), --config.pipeline.steps.NAME
one stage's steps, --config.pipeline.overrides.NAME.FIELD a field the config lists for one
stage; --config.pipeline.budget_s=SECONDS shares a time budget among the stages
(pipeline.budget_share). Running the same command again skips the finished stages and
resumes the unfinished one. The multi-host options are those of grain-jax train.
(Each stage directory is an ordinary training workdir: its config.json holds training fields
only, so `grain-jax train` resumes it; WORKDIR/pipeline.json lists the finished stages.
train/config.py says what a pipeline config holds.)
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax

from grain_jax.formats.weights import read_meta
from grain_jax.train import checkpoints, loop
from grain_jax.train.config import check_pipeline, stage_config
from grain_jax.util import files, runs

log = logging.getLogger("grain_jax.pipeline")

RECORD = "pipeline.json"


def stage_dirs(cfg, workdir: str) -> list[str]:
  """WORKDIR/stage{k}_{name} of each stage."""
  return [os.path.join(workdir, f"stage{k}_{name}")
          for k, name in enumerate(cfg.pipeline.stages, 1)]


def _budget(cfg, started: float, stage: str, remaining) -> float:
  """This stage's seconds: its share of what is left of the budget (0: fixed steps)."""
  p = cfg.pipeline
  if p.budget_s <= 0:
    return 0.0
  left = started + p.budget_s - p.budget_reserve_s - runs.clock()
  share = lambda s: float(p.budget_share.get(s, 1.0))
  return max(1.0, left * share(stage) / sum(share(s) for s in remaining))


def _finished(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["workdir"]: r for r in json.load(f)["stages"]}


def run(cfg, workdir: str, progress: bool = True, started: float | None = None) -> list[dict]:
  """Trains the pipeline's stages in turn (skipping those finished by an earlier run);
  returns one record per stage: stage, workdir (relative), steps, seconds. The workdir is
  locked while it runs. `started` (util.runs.clock(); default now) starts the budget."""
  started = runs.clock() if started is None else started
  check_pipeline(cfg)
  workdir = files.check_writable(workdir, "workdir")
  with runs.locked(workdir, "pipeline run"):
    return train_stages(cfg, workdir, progress, started)


def train_stages(cfg, workdir: str, progress: bool, started: float) -> list[dict]:
  """`run` for a caller that holds the workdir's lock (util.runs.locked) and checked
  `cfg`."""
  names, done = cfg.pipeline.stages, _finished(workdir)
  previous, records = "", []
  for k, (stage, stage_dir) in enumerate(zip(names, stage_dirs(cfg, workdir)), 1):
    rel = os.path.basename(stage_dir)
    if rel in done:
      checkpoints.compare_config(stage_dir, stage_config(cfg, stage, previous))
      records.append(done[rel])
      print(f"stage {k}/{len(names)} {stage}: finished earlier ({done[rel]['steps']} steps)",
            flush=True)
      previous = stage_dir
      continue
    budget = _budget(cfg, started, stage, names[k - 1:])
    log.info("stage %d/%d: %s (%s)", k, len(names), stage,
             f"{budget:.0f} s budget" if budget else f"{cfg.pipeline.steps.get(stage)} steps")
    t = time.perf_counter()
    loop.train_and_evaluate(stage_config(cfg, stage, previous, budget), stage_dir, progress,
                            started=runs.clock())
    steps = read_meta(os.path.join(stage_dir, "weights"))["sources"]["trained_steps"]
    records.append({"stage": stage, "workdir": rel, "steps": steps,
                    "seconds": round(time.perf_counter() - t, 1)})
    if jax.process_index() == 0:
      files.write_json(os.path.join(workdir, RECORD), {"stages": records})
    print(f"stage {k}/{len(names)} {stage}: {steps} steps in {records[-1]['seconds']:.0f} s",
          flush=True)
    previous = stage_dir
  return records
