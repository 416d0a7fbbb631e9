"""A training run's checkpoints: the config they were made with, the Orbax CheckpointManager
(train state and data position, saved together), restoring with a fallback past damaged ones,
and the weights/ folder each checkpoint also exports (`export_weights`).

WORKDIR/config.json is the run's config: a restart with another config is refused, except for
RESUMABLE_CHANGES (how long a run runs and how it reports). A checkpoint that cannot be
restored is set aside (into checkpoints_unreadable/) and the previous one used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil

import grain  # the data-loading library, not this project
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils
from orbax.checkpoint._src.futures import synchronization as orbax_sync

from grain_jax.data.input_pipeline import TrainData
from grain_jax.formats.weights import RUN_OPTIONS, restore_error, save_weights
from grain_jax.nets.model import per_network_variables
from grain_jax.train import losses, packed, stages
from grain_jax.train.optim import model_params
from grain_jax.train.state import TrainState, variables_of
from grain_jax.util import disk_space, distributed, files, orbax_log_filter

log = logging.getLogger("grain_jax.train")

# Fields that may change when a run is resumed: how long it runs and how it reports.
RESUMABLE_CHANGES = ("max_steps", "log_every", "image_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "data.workers", "data.eval", "data.eval_max_images",
                     "data.eval_identity", "data.eval_fid", "data.eval_inception",
                     "data.eval_fid_dims", "time_budget_s", "budget_probe_steps",
                     "max_nonfinite_steps", "time_limit_s", "stop_signal", "stop_check_every",
                     # how to run, not what (compute_dtype, remat, ...)
                     *(f"model.{k}" for k in RUN_OPTIONS))


def added_fields() -> dict:
  """Fields added by later versions, at the value that reproduces what earlier versions did: a
  checkpoint's config without one matches that value (a loss term it did not have was off)."""
  return {"model.fea2code.n_codes": 0, "model.generator.conv_clamp": 0.0,
          "model.discriminator.conv_clamp": 0.0, **{f"loss.{k}": 0.0 for k in losses.LOSSES}}


# Fields the demo of earlier versions wrote into its stages' config.json (no training field).
OLD_DEMO_PREFIXES = ("demo", "stage_", "stages", "validate_stages")


class ConfigMismatchError(ValueError):
  """A workdir's checkpoints were made with another config."""


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir can be restored."""


def compare_config(workdir: str, cfg: ml_collections.ConfigDict) -> bool:
  """Whether the workdir holds checkpoints; if so, refuses (ConfigMismatchError) a config
  that differs from theirs (WORKDIR/config.json) other than in RESUMABLE_CHANGES, naming each
  differing field."""
  path = os.path.join(workdir, "config.json")
  ckpts = os.path.join(workdir, "checkpoints")
  resuming = os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))
  if resuming and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = (traverse_util.flatten_dict(d, sep=".") for d in (old, json.loads(cfg.to_json())))
    a = {**{k: v for k, v in added_fields().items() if k in b}, **a}
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
                  and not k.startswith(OLD_DEMO_PREFIXES))
    if diff:
      fields = "; ".join(f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in diff)
      raise ConfigMismatchError(
          f"{workdir} holds a run with another config ({fields}); resuming it would mix runs: "
          f"use a new --workdir, or the checkpoint's values")
  return resuming


def check_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """compare_config, then writes WORKDIR/config.json (the config the checkpoints are of)."""
  compare_config(workdir, cfg)
  if jax.process_index() == 0:  # one writer; every host compared above
    files.write_json(os.path.join(workdir, "config.json"), json.loads(cfg.to_json()))


def space_needed(written_bytes: int) -> int:
  """The free space a checkpoint and weights export of `written_bytes` (the last ones'
  size) ask for: 5% more, as later checkpoints may compress less well, and 1 MiB for the
  logs written meanwhile."""
  return int(written_bytes * 1.05) + 2**20


class Checkpoints:
  """The workdir's Orbax CheckpointManager: train state and data position, saved together."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = workdir
    self.directory = os.path.join(workdir, "checkpoints")
    self.weights = os.path.join(workdir, "weights")
    self.keep = keep
    self.disk_full_reported = False
    orbax_log_filter.silence_failed_write()
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
    """The newest checkpoint that restores (shaped like `state`, replicated); moves `data` to its
    position. A newer one that fails (truncated by a full disk, say) is moved to
    checkpoints_unreadable/ with a warning naming both steps, so the run continues from the
    one before and can save that step number again."""
    args = ocp.args
    steps = sorted(self.mgr.all_steps(), reverse=True)
    failures = []
    orbax_log_filter.silence_failed_read()
    if steps:
      self._check_process_count(steps[0])
    # Checkpoints hold the state per tensor (packed.py): restored so, packed after.
    sharding = jax.tree_util.tree_leaves(state)[0].sharding
    on_disk = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        jax.eval_shape(packed.unpack_all, state))
    for step in steps:
      try:
        target = self._target(step, on_disk)
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
        found = packed.pack_like(state, found)
      except Exception as e:  # Orbax raises many kinds for a damaged checkpoint
        failures.append((step, restore_error(e)))
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
      multihost_utils.sync_global_devices("grain_jax: unreadable checkpoints set aside")
    self.mgr.reload()  # forget the steps moved away

  def save(self, step: int, state, data: TrainData, export=None) -> None:
    """Saves a checkpoint of `step` (train state and data position; written in the
    background) and, on process 0, `export(WORKDIR/weights)`.

    Space first: the previous save is waited for, then the free space is compared with what
    this save writes (the last checkpoint's size and the weights', or twice the state's
    bytes the first time); when it is short and the oldest checkpoint would go at this save
    anyway (keep_checkpoints reached), that one is removed first. Still short, or a write
    that fails for lack of space: disk_space.DiskFullError, one line, with the partial
    checkpoint removed and the earlier ones intact."""
    self.wait()
    self._make_room(step, state)
    what = f"checkpoint step {step} in {self.directory}"
    _align_orbax_operation_ids()
    try:
      args = ocp.args
      self.mgr.save(step, args=args.Composite(
          state=args.StandardSave(packed.unpack_all(state)),
          host_data=grain.checkpoint.CheckpointSave(data.iterator)))
      self.last_saved = step
      if export is not None and jax.process_index() == 0:
        what = f"the weights of step {step} to {self.weights}"
        export(self.weights)
    except Exception as e:
      if not disk_space.is_disk_full(e):
        raise
      with contextlib.suppress(Exception):  # the checkpoint, if it is the export that failed
        self.mgr.wait_until_finished()
      raise self._disk_full(what, e) from e

  def wait(self) -> None:
    """Waits for the checkpoint being written; a failure for lack of space raises
    DiskFullError (the partial checkpoint removed)."""
    try:
      self.mgr.wait_until_finished()
    except Exception as e:
      if not disk_space.is_disk_full(e):
        raise
      raise self._disk_full(f"checkpoint step {self.last_saved} in {self.directory}", e) from e

  def _make_room(self, step: int, state) -> None:
    steps = sorted(self.mgr.all_steps())
    if steps:
      need = space_needed(disk_space.folder_bytes(os.path.join(self.directory, str(steps[-1])))
                          + disk_space.folder_bytes(self.weights))
    else:
      need = space_needed(2 * sum(a.nbytes for a in jax.tree_util.tree_leaves(state)))
    removed, free_before = [], None
    while True:
      # Process 0's view, so that every process decides the same; in KiB for an int32 (a
      # disk with more than 2 TiB free counts as 2 TiB).
      free = 2**10 * int(distributed.broadcast_from_first(np.int32(min(
          disk_space.free_bytes(self.directory) >> 10, 2**31 - 1))))
      free_before = free if free_before is None else free_before
      if free >= need:
        break
      if not (self.keep and len(steps) >= self.keep and len(steps) > 1):
        raise disk_space.DiskFullError(
            f"not enough space to save checkpoint step {step} in {self.directory}: it and "
            f"the weights need about {disk_space.mb(need)}, {disk_space.mb(free)} is free"
            + (f" after removing checkpoint {', '.join(map(str, removed))}" if removed else "")
            + f"; {self.describe_last()}: free some space (or lower keep_checkpoints) and "
            f"{self._rerun()}")
      oldest = steps.pop(0)  # keep_checkpoints would remove it once this one is saved
      self.mgr.delete(oldest)
      removed.append(oldest)
    if removed:
      log.warning("checkpoint %s removed before saving step %d, to make room (%s was free, "
                  "about %s needed)", ", ".join(map(str, removed)), step,
                  disk_space.mb(free_before), disk_space.mb(need))

  def _disk_full(self, what: str, e: BaseException) -> disk_space.DiskFullError:
    """After a write failed for lack of space: removes the partial checkpoint and says so."""
    self.disk_full_reported = True
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if "orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.mgr.reload()
    self.last_saved = self.mgr.latest_step()
    if isinstance(e, disk_space.DiskFullError):  # the weights export said what it needed
      return disk_space.DiskFullError(f"{e}; {self.describe_last()}: free some space and "
                                      f"{self._rerun()}")
    return disk_space.DiskFullError(
        f"no space left to save {what} "
        f"({disk_space.mb(disk_space.free_bytes(self.directory))} is free); the partial "
        f"checkpoint was removed and {self.describe_last()}: free some space (or lower "
        f"keep_checkpoints) and {self._rerun()}")

  def describe_last(self) -> str:
    if self.last_saved is None:
      return "no checkpoint was saved"
    return f"the last checkpoint is step {self.last_saved} in {self.directory}"

  def _rerun(self) -> str:
    return ("run the same command again to resume from it" if self.last_saved is not None
            else "run the same command again")

  def close(self) -> None:
    """Waits for the checkpoint being written, then closes the manager. A failure for lack
    of space raises DiskFullError once: Orbax reports it again when closing."""
    try:
      self.wait()
    finally:
      try:
        self.mgr.close()
      except Exception as e:
        if not disk_space.is_disk_full(e):
          raise
        if not self.disk_full_reported:
          raise self._disk_full(f"checkpoint step {self.last_saved} in {self.directory}",
                                e) from e


def _align_orbax_operation_ids() -> None:
  """Brings every process to the same Orbax operation id before a checkpoint they save
  together.

  Orbax numbers each save with a per-process counter (OperationIdGenerator, in a private
  module: no public one has it), and a process other than the first writes its files once
  process 0 has signalled, under that number, that it created the checkpoint's temporary
  folders. Process 0 alone also saves with Orbax (the weights/ and best/ exports, with a
  checkpointer of its own: formats/weights.py), which advances its counter only. From a
  job's second checkpoint on, process 1 looked for the signal under a number whose save was
  long over, did not wait, and wrote its data position into a folder not yet created:
  FileNotFoundError, process 1 left, and process 0 waited in the checkpoint's barrier until
  process 1 missed its heartbeats. So each save starts from the largest counter of all
  processes (Orbax's own multi-process test runner aligns it the same way)."""
  if not distributed.multiprocess():
    return
  ids = orbax_sync.OperationIdGenerator
  target = int(np.max(multihost_utils.process_allgather(
      np.int32(ids.get_current_operation_id()))))
  while int(ids.get_current_operation_id()) < target:
    ids.next_operation_id()


def export_weights(path: str, cfg, state: TrainState, loss_vars: dict,
                   origin: dict) -> None:
  """The state's networks as a converted-weights directory (grain_jax.load reads it)."""
  host = distributed.host_copy
  tree = per_network_variables(host(variables_of(state)))
  d = {"params": host(model_params(state.d_params))}
  if d["params"]:  # no discriminator when the adversarial loss is off
    if state.d_batch_stats:
      d["batch_stats"] = host(state.d_batch_stats)
    tree[stages.get(cfg.stage).discriminator] = d
  tree.update({k: host(v) for k, v in loss_vars.items()})
  sources = dict(origin, trained_steps=int(state.step), stage=cfg.stage)
  save_weights(path, tree, cfg.model, sources, force=True)
