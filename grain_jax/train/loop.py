"""The training loop of one GRAIN stage: `train_and_evaluate(config, workdir)` (what
`grain-jax train` runs for a stage's config).

The loop's helpers have modules of their own: initial_weights (where the networks start
from), checkpoints (config check, Orbax checkpoints, resume, the weights/ export), summaries
(losses, previews), validation (held-out metrics, best/), step (the jitted step) and state
(what it updates), stopping (signals, time limits). The workdir holds
    config.json        the run's config (a restart with another config is refused)
    checkpoints/       Orbax CheckpointManager: train state (params, optimizer and
                       discriminator states, step, rng) and the data iterator position
    weights/           the latest networks as a converted-weights directory (what the next
                       stage, grain_jax.load, `grain-jax down|up|evaluate` read)
    best/              the same for the best validation score so far
    tensorboard/       scalars and the 8-panel image grids; images/ has the grids as PNG
    train_metrics.jsonl  the logged training losses, one JSON line per log step
    metrics.json       the last validation (grain-jax evaluate's keys)
    .lock              held by the run using the workdir (a second run is refused)
Running the same command again resumes from the latest checkpoint and gives the same result
as an uninterrupted run. A step whose loss or new state is not finite is skipped
(step.py's divergence guard); after `max_nonfinite_steps` such steps in a row the run
stops (TrainingDiverged), its checkpoints all finite.
"""
from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax.data.input_pipeline import TrainData
from grain_jax.train import checkpoints, stopping, summaries, validation
from grain_jax.train.initial_weights import initial_variables
from grain_jax.train.state import state_is_finite
from grain_jax.train.step import AXIS, create_training
from grain_jax.util import distributed, files, runs
from grain_jax.util.progress import progress_bar

log = logging.getLogger("grain_jax.train")


class TrainingDiverged(RuntimeError):
  """Too many consecutive steps with a non-finite loss or state."""


# ------------------------------------------------------------------------------ the loop

def _due(step: int, every: int, last: int) -> bool:
  """Every `every` steps (0: never) and at the last step."""
  return bool(every and step % every == 0) or step == last


def _mesh(cfg) -> tuple[Mesh, int]:
  """A ("data",) mesh of every device of every host, and the global batch size."""
  devices = jax.devices()
  batch_size = cfg.batch_size or len(devices)
  if batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {len(devices)} devices")
  return Mesh(np.array(devices), (AXIS,)), batch_size


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
  with runs.locked(workdir, "training run"):
    return _train(cfg, workdir, progress, runs.clock() if started is None else started)


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
      self.t0 = runs.clock()
      return None
    if step < self.first + 1 + self.probe:
      return None
    jax.block_until_ready(metrics["loss"])
    now = runs.clock()
    per_step = (now - self.t0) / self.probe
    reserve = 1.0 + 0.02 * float(self.cfg.time_budget_s)  # last checkpoint, export, close
    more = max(0, int((self.deadline - now - reserve) / per_step))
    last = int(distributed.broadcast_from_first(np.int32(min(self.cfg.max_steps, step + more))))
    log.info("time budget %.0f s: %.3f s/step over steps %d-%d, %.0f s left -> %d steps",
             self.cfg.time_budget_s, per_step, self.first + 2, step, self.deadline - now, last)
    return last


def _diverged(cfg, step: int, run: int, ckpts: checkpoints.Checkpoints) -> TrainingDiverged:
  return TrainingDiverged(
      f"training diverged at step {step}: the loss or the updated weights were not finite for "
      f"{run} steps in a row (steps {step - run + 1}-{step}, max_nonfinite_steps "
      f"{cfg.max_nonfinite_steps}); those updates were skipped and nothing non-finite was "
      f"saved; {ckpts.describe_last()}. Try a lower learning_rate (now {cfg.learning_rate:g}) "
      f"or check the data")


def _train(cfg, workdir: str, progress: bool, started: float) -> dict:
  checkpoints.check_config(workdir, cfg)
  mesh, batch_size = _mesh(cfg)
  ckpts = checkpoints.Checkpoints(workdir, cfg.keep_checkpoints)
  # The data first: a misfed run fails before minutes of compilation.
  data = TrainData(cfg.data, int(cfg.model.hr_size), batch_size // jax.process_count(),
                   cfg.seed, jax.process_index(), jax.process_count())
  # On resume the checkpoint replaces every value: skip compiling random initialisers.
  variables, d_variables, loss_vars, origin = initial_variables(cfg, ckpts.resuming)
  training = create_training(cfg, variables, d_variables, loss_vars, mesh)
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
    decided = int(distributed.host_copy(state.schedule_steps))
    if decided == cfg.max_steps:  # a new run, or one saved before its budget decided
      budget = _Budget(cfg, started, first)
    else:  # a resumed run keeps the length its budget decided
      last = min(cfg.max_steps, decided)
  if ckpts.resuming:
    log.info("resumed %s at step %d", workdir, first)
  report = summaries.Reporter(cfg, workdir, training.model, first, mesh)
  validate = (validation.Validation(cfg, workdir, training.model, variables, loss_vars)
              if cfg.data.eval else None)
  del variables, d_variables
  export = lambda path: checkpoints.export_weights(path, cfg, state, loss_vars, origin)
  batch_sharding = NamedSharding(mesh, P(AXIS))
  bar = progress_bar(last, f"train {cfg.stage}", "step", progress, initial=first)
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

  stops = stopping.Requests(cfg, started, runs.clock)
  stops.install()
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
        ckpts.save(step, state, data, export)
      if validate and _due(step, cfg.eval_every, last):
        last_metrics = validate(step, state, export)
        report.validation(step, last_metrics, validate.evaluator.names)
      if step < last and (why := stops.due(step)):
        if pending is not None:  # None: checked before this step's checkpoint
          check(*pending)
        if ckpts.last_saved != step:
          ckpts.save(step, state, data, export)
        raise stopping.Interrupted(step, why, workdir)
    if pending is not None:
      check(*pending)
  finally:
    stops.restore()
    ckpts.close()  # an error above still lets the last checkpoint commit
    bar.close()
    report.close()
  if data.skipped():
    log.warning("%d training examples could not be read and were skipped", data.skipped())
  return last_metrics
