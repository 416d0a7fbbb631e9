"""Training stages in sequence, each starting from the previous one's result: `grain-jax
pipeline` (and `grain-jax train` with a pipeline config).

A pipeline config is a training config (configs/training.py) without `stage`, plus `pipeline`:
  stages            the stages in order; stage k trains in WORKDIR/stage{k}_{name} and starts
                    from stage k-1's result (init.previous_workdir), the first from init.*
  steps             {stage: max_steps} of each stage when budget_s is 0
  overrides         {stage: {field: value}}: training fields of one stage
  budget_s          > 0: the stages take about this long together: before each, what is left
                    (less budget_reserve_s) is split among the stages left by budget_share, and
                    the stage trains as many steps as fit (its time_budget_s; max_steps caps)
  budget_share      {stage: share} (a stage not listed: 1)
  budget_reserve_s  seconds kept for what follows the stages (the demo's evaluation)
The fields whose default is each stage's own (stages.STAGES: learning_rate, d_every,
loss.lr_l2) are STAGE_DEFAULT (-1) in a pipeline config, which gives each stage its own; any
other value applies to every stage. A stage's config.json holds training fields only, so each
stage directory is an ordinary training workdir (`grain-jax train` resumes it).

WORKDIR/pipeline.json lists the finished stages: a rerun skips them (after checking that
their config is unchanged) and resumes the unfinished one from its latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
from flax import traverse_util

from grain_jax import checkpoints, files, stages, weights
from grain_jax.configs.training import training_config

log = logging.getLogger("grain_jax.pipeline")

STAGE_DEFAULT = -1
RECORD = "pipeline.json"


def _flat(c) -> dict:
  """{'a.b': value} of a ConfigDict or dict."""
  return traverse_util.flatten_dict(c.to_dict() if hasattr(c, "to_dict") else dict(c), sep=".")


def stage_dependent_fields() -> list[str]:
  """The training fields whose default differs between stages (besides `stage`)."""
  flat = [_flat(training_config(s)) for s in stages.NAMES]
  return sorted(k for k in flat[0] if k != "stage" and len({repr(f[k]) for f in flat}) > 1)


def _set(c: ml_collections.ConfigDict, key: str, value, where: str) -> None:
  *path, last = key.split(".")
  for p in path:
    c = c.get(p) if isinstance(c, ml_collections.ConfigDict) else None
    if c is None:
      break
  if not isinstance(c, ml_collections.ConfigDict) or last not in c:
    raise ValueError(f"{where}: a training config has no field {key}")
  c[last] = value


def pipeline_config(model=None, stage_names=stages.NAMES) -> ml_collections.ConfigDict:
  """A pipeline of `stage_names` with the original's recipe of each (1024 unless `model`)."""
  c = training_config(stage_names[0], model)
  del c["stage"]
  defaults = _flat(c)
  for key in stage_dependent_fields():
    _set(c, key, type(defaults[key])(STAGE_DEFAULT), "pipeline_config")
  c.pipeline = ml_collections.ConfigDict(dict(
      stages=tuple(stage_names), steps={s: int(c.max_steps) for s in stage_names},
      overrides={s: {} for s in stage_names}, budget_s=0.0,
      budget_share={s: 1.0 for s in stage_names}, budget_reserve_s=0.0))
  return c


def is_pipeline(cfg) -> bool:
  return "pipeline" in cfg


OVERRIDE_FLAG = "--config.pipeline.overrides."


def split_stage_overrides(args: list[str]) -> tuple[list[str], list[str]]:
  """(the other arguments, the --config.pipeline.overrides.STAGE.FIELD=VALUE ones)."""
  mine = [a for a in args if a.startswith(OVERRIDE_FLAG)]
  return [a for a in args if a not in mine], mine


def _parse(text: str, like, what: str):
  """A command-line value of the type of `like`."""
  import ast

  try:
    if isinstance(like, bool):
      return {"true": True, "false": False}[text.lower()]
    if isinstance(like, str):
      return text
    if isinstance(like, (int, float)):
      return type(like)(text)
    return type(like)(ast.literal_eval(text))
  except (KeyError, ValueError, SyntaxError, TypeError):
    raise ValueError(f"{what}: {text!r} is not a {type(like).__name__}") from None


def apply_stage_overrides(cfg, args: list[str]) -> None:
  """Applies --config.pipeline.overrides.STAGE.FIELD=VALUE arguments: any training field of
  one stage, whether or not the config lists it (ml_collections' own overrides reach only
  the fields a config has)."""
  for arg in args:
    key, sep, text = arg[len(OVERRIDE_FLAG):].partition("=")
    stage, _, field = key.partition(".")
    if not (sep and field):
      raise ValueError(f"{arg}: expected {OVERRIDE_FLAG}STAGE.FIELD=VALUE")
    if not is_pipeline(cfg) or stage not in cfg.pipeline.stages:
      raise ValueError(f"{arg}: {stage} is not a stage of this pipeline" if is_pipeline(cfg)
                       else f"{arg}: the config is not a pipeline's")
    default = _flat(training_config(stage)).get(field)
    if default is None:
      raise ValueError(f"{arg}: a training config has no field {field}")
    flat = {**_flat(cfg.pipeline.overrides.get(stage) or {}),
            field: _parse(text, default, arg)}
    with cfg.unlocked():
      cfg.pipeline.overrides[stage] = traverse_util.unflatten_dict(flat, sep=".")


def stage_config(cfg, stage: str, previous: str = "",
                 budget_s: float = 0.0) -> ml_collections.ConfigDict:
  """The training config of `stage` in pipeline `cfg`: the stage's recipe, the pipeline's
  shared fields (those at STAGE_DEFAULT excepted), the stage's overrides, its steps (or a
  time budget, max_steps capping it) and the previous stage's workdir."""
  p = cfg.pipeline
  c = training_config(stage, ml_collections.ConfigDict(cfg.model.to_dict()))
  own, fields = set(stage_dependent_fields()), _flat(c)
  for key, value in _flat(cfg).items():
    if key in fields and not (key in own and value == STAGE_DEFAULT):
      _set(c, key, value, "pipeline")  # (other fields are not training's: the demo's, say)
  for key, value in _flat(p.overrides.get(stage) or {}).items():
    _set(c, key, value, f"pipeline.overrides.{stage}")
  if budget_s > 0:
    c.time_budget_s = float(budget_s)
  elif stage in p.steps:
    c.max_steps = int(p.steps[stage])
  if previous:
    c.init.previous_workdir = previous
  return c


def check(cfg) -> None:
  """Refuses a pipeline config with unknown stages or per-stage fields, before any work.
  (Entries for stages it does not run are allowed: a run of some of a config's stages.)"""
  p = cfg.pipeline
  if not p.stages:
    raise ValueError("pipeline.stages is empty")
  for name in p.stages:
    stages.get(name)
  for field in ("steps", "overrides", "budget_share"):
    unknown = sorted(set(p[field]) - set(stages.NAMES))
    if unknown:
      raise ValueError(f"pipeline.{field}: unknown stages {', '.join(unknown)} (stages: "
                       f"{', '.join(stages.NAMES)})")
  for name in p.stages:
    stage_config(cfg, name, "")


def stage_dirs(cfg, workdir: str) -> list[str]:
  """WORKDIR/stage{k}_{name} of each stage."""
  return [os.path.join(workdir, f"stage{k}_{name}")
          for k, name in enumerate(cfg.pipeline.stages, 1)]


def _budget(cfg, started: float, stage: str, remaining) -> float:
  """This stage's seconds: its share of what is left of the budget (0: fixed steps)."""
  p = cfg.pipeline
  if p.budget_s <= 0:
    return 0.0
  from grain_jax import trainer
  left = started + p.budget_s - p.budget_reserve_s - trainer.clock()
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
  locked while it runs. `started` (trainer.clock(); default now) starts the budget."""
  from grain_jax import trainer

  started = trainer.clock() if started is None else started
  check(cfg)
  workdir = files.check_writable(workdir, "workdir")
  with trainer.locked(workdir, "pipeline run"):
    return train_stages(cfg, workdir, progress, started)


def train_stages(cfg, workdir: str, progress: bool, started: float) -> list[dict]:
  """`run` for a caller that holds the workdir's lock (trainer.locked) and checked `cfg`."""
  from grain_jax import trainer

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
    trainer.train_and_evaluate(stage_config(cfg, stage, previous, budget), stage_dir, progress,
                               started=trainer.clock())
    steps = weights.read_meta(os.path.join(stage_dir, "weights"))["sources"]["trained_steps"]
    records.append({"stage": stage, "workdir": rel, "steps": steps,
                    "seconds": round(time.perf_counter() - t, 1)})
    if jax.process_index() == 0:
      files.write_json(os.path.join(workdir, RECORD), {"stages": records})
    print(f"stage {k}/{len(names)} {stage}: {steps} steps in {records[-1]['seconds']:.0f} s",
          flush=True)
    previous = stage_dir
  return records
