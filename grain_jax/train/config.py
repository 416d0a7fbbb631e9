"""Training configs: the builders of a stage's config and of a pipeline's, and their
per-stage fields.

`training_config(stage)` is one GRAIN stage with the original's 1024 hyper-parameters (the
built-in `--config invrrdb`, ...); `pipeline_config()` is stages in sequence (`grain1024`,
the quick start's `demo`). The config files (grain_jax/configs/, the clone's configs/) build
on them. Every field can be overridden on the command line, e.g. `--config.batch_size=8`;
`grain-jax train --config NAME --show_config` lists them.

A pipeline config is a training config without `stage`, plus `pipeline`:
  stages            the stages in order; stage k trains in WORKDIR/stage{k}_{name} and starts
                    from stage k-1's result (init.previous_workdir), the first from init.*
  steps             {stage: max_steps} of each stage when budget_s is 0
  overrides         {stage: {field: value}}: training fields of one stage
  budget_s          > 0: the stages take about this long together: before each, what is left
                    (less budget_reserve_s) is split among the stages left by budget_share, and
                    the stage trains as many steps as fit (its time_budget_s; max_steps caps)
  budget_share      {stage: share} (a stage not listed: 1)
  budget_reserve_s  seconds kept for what follows the stages (the quick start's evaluation)
The fields whose default is each stage's own (stages.STAGES: learning_rate, d_every,
loss.lr_l2) are STAGE_DEFAULT (-1) in a pipeline config, which gives each stage its own; any
other value applies to every stage. `stage_config` makes one stage's training config of it.
"""
from __future__ import annotations

import ast

import ml_collections
from flax import traverse_util

from grain_jax.nets import model_config
from grain_jax.train import losses, stages


def training_config(stage: str, model=None) -> ml_collections.ConfigDict:
  """The config of one stage (stages.STAGES gives its recipe); `model` defaults to 1024."""
  s = stages.get(stage)
  c = ml_collections.ConfigDict()
  c.model = model if model is not None else model_config.grain_1024()
  c.stage = stage
  # Where the starting weights come from. `weights`: a converted weights directory
  # (grain-jax convert) with the StyleGAN2 G (stages 2-4), its D, IR-SE50 and LPIPS, and any
  # GRAIN networks; `previous_workdir`: the previous stage's workdir, whose trained networks
  # are taken from its latest weights (they override `weights`). Networks in `random_init`
  # may start from random weights when neither source has them.
  c.init = ml_collections.ConfigDict(dict(
      weights="", previous_workdir="",
      random_init=("rescaler", "fea2code", "fusion", "discriminator", "patch_discriminator"),
      random_all=False,
      # Randomly initialised rescaler and Fusion start as resamplers (box down, nearest up,
      # Fusion passing the decoder's image through; see resample_start.py) instead of from
      # PyTorch's default init alone. For short runs from scratch, such as the demo.
      resample_start=False))
  c.data = ml_collections.ConfigDict(dict(
      train="",            # folder of images (or source folder) or tfds:NAME/SPLIT
      train_target="",     # optional folder of targets with the same file names (paired data)
      eval="",             # held-out folder or tfds:NAME/SPLIT for validation ('' = none)
      data_dir="",         # TFDS data_dir
      crop="center",       # 'center': center square resized to hr; 'random': random crops
      random_scale=(1.0, 1.0),  # 'random': resize by a factor in this range, then crop
      hflip=False,
      workers=4,
      eval_max_images=50,  # the original validates on the first 50 test images
      eval_identity=True,  # identity similarity in validation (when IR-SE50 weights are loaded)
      eval_fid=False,      # FID/KID in validation (InceptionV3 on every output: slower)
      eval_inception="",   # pytorch-fid's .pth or a weights folder ('' = init.weights')
      eval_fid_dims=2048,  # Inception features for FID/KID (pytorch-fid's --dims)
  ))
  c.batch_size = 0          # global batch; 0 = one image per device (the original: 1 per GPU)
  c.learning_rate = s.learning_rate
  c.lr_schedule = "constant"  # or 'cosine' (to 0 at max_steps), both after warmup_steps
  c.warmup_steps = 0
  # b1 ... slow_step_size are Ranger's; name 'adam' is torch.optim.Adam with its defaults
  # (0.9, 0.999, 1e-8), as the original's --optim_name adam, and ignores them.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="ranger", b1=0.95, b2=0.999, eps=1e-5, sync_period=6, slow_step_size=0.5))
  c.d_learning_rate = -1.0  # < 0: same as learning_rate (the original)
  # The weight of each generator loss term (losses.LOSSES: what each is; 0 = off). GRAIN's
  # are l2, lr_l2, lpips, id and adv; ssim is off.
  c.loss = ml_collections.ConfigDict(losses.default_weights(s))
  c.d_every = s.d_every     # discriminator update every N steps (0: never)
  c.r1_gamma = 10.0
  c.r1_every = 16
  c.max_steps = 300000
  # > 0: train for about this many seconds (setup and compilation included): the step count,
  # and the cosine schedule's length, are set from the step time measured over the first
  # budget_probe_steps steps after the compiling one; max_steps is then a cap.
  c.time_budget_s = 0.0
  c.budget_probe_steps = 5
  c.log_every = 5000       # the original's board_interval
  c.image_every = 5000
  c.eval_every = 20000
  c.checkpoint_every = 20000
  c.keep_checkpoints = 3
  # A step whose loss or updated weights are not finite is skipped (nothing changes); after
  # this many in a row the run stops with exit status 2 (0: never stop, keep skipping).
  c.max_nonfinite_steps = 20
  # Stopping early with a checkpoint of the current step (exit status 75; the same command
  # resumes): on SIGTERM, SIGINT, `stop_signal` (e.g. 'SIGUSR1' for SLURM's --signal) and
  # once `time_limit_s` seconds (> 0) have passed since the start. A multi-process job
  # compares its processes' requests every `stop_check_every` steps (a collective).
  c.time_limit_s = 0.0
  c.stop_signal = ""
  c.stop_check_every = 10
  c.seed = 0
  return c


# ------------------------------------------------------------------------------ pipelines

STAGE_DEFAULT = -1


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


def check_pipeline(cfg) -> None:
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
