"""Converted-weights directories: one Orbax checkpoint of every network plus the model config.

Layout of DIR (written by `grain-jax convert` and by training, read by grain_jax.load):
    DIR/grain_weights.json   format tag, model config, networks present, source files
    DIR/variables/           Orbax (StandardCheckpointer) tree {network: variables}, with the
                             network names of nets/registry.py ('rescaler', 'generator', ...) and
                             each network's collections ('params'[, 'buffers' | 'batch_stats'])
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from grain_jax.util import disk_space, files, orbax_log_filter

FORMAT = "grain_jax.weights/2"
# Format 1 kept the four model networks in one group: {'grain': {'params': {name: ...},
# 'buffers': {'generator': ...}}, other networks: ...}. It is still read.
FORMAT_1 = "grain_jax.weights/1"
META = "grain_weights.json"


class WeightsError(ValueError):
  """A weights directory that is missing, incomplete or of another kind."""


RUN_OPTIONS = ("compute_dtype", "remat", "remat_per_example", "inference_chunk",
               "conv_weight_grad", "scan_blocks")
TEMP_PREFIX = ".grain_weights-"  # temp folders beside DIR: PREFIX + host-pid-random


def check_target(directory: str, force: bool = False) -> str:
  """Checks, before any work, that save_weights(directory, force=force) may write there;
  returns the absolute path.

  A missing or empty folder is fine; an existing weights folder (it has META) needs force;
  anything else (a file, a folder of the user's) is refused even with force, so nothing of
  the user's is ever deleted. The parent folder must be writable.
  """
  directory = os.path.abspath(directory)
  if os.path.lexists(directory):  # replacing it takes renames in its parent
    files.check_can_create(os.path.dirname(directory), "the folder")
  else:
    files.check_can_create(directory, "output folder")
  if os.path.isdir(directory):
    if not os.listdir(directory):
      return directory  # nothing to lose
    if not os.path.isfile(os.path.join(directory, META)):
      raise FileExistsError(f"{directory} exists and is not a weights folder (no {META}); "
                            f"refusing to replace it, even with --force: move it away or "
                            f"choose another folder")
    if not force:
      raise FileExistsError(f"{directory} exists; pass --force to replace it")
  elif os.path.lexists(directory):
    raise FileExistsError(f"{directory} exists and is not a folder; refusing to replace it")
  return directory


def save_weights(directory: str, tree: dict, model_cfg: ml_collections.ConfigDict,
                 sources: dict[str, Any], force: bool = False) -> str:
  """Writes `tree` ({network: variables}) and its config to `directory`, atomically (temp
  dir, then rename); the networks present are recorded from the tree's keys.

  An existing weights directory is only replaced with force=True, and only after the new one
  is completely written, so a failure never loses the old weights; an existing folder that
  is not a weights directory is never replaced (see check_target). Temp folders left by a
  killed writer are removed first. A write that fails for lack of space raises
  disk_space.DiskFullError (one line: the folder, the size needed, the space free).
  """
  orbax_log_filter.silence_failed_write()
  directory = os.path.abspath(directory)
  _recover_interrupted_replace(os.path.dirname(directory))
  directory = check_target(directory, force)
  parent = os.path.dirname(directory)
  files.remove_stale_temp_dirs(parent, TEMP_PREFIX)
  tmp = files.make_temp_dir(parent, TEMP_PREFIX)
  trash = None
  try:
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a), tree)
    ckptr = _checkpointer()
    ckptr.save(os.path.join(tmp, "variables"), tree)
    ckptr.wait_until_finished()
    # RUN_OPTIONS (compute_dtype, remat, ...) are choices of how to run, not part of the
    # weights.
    model = {k: v for k, v in model_cfg.to_dict().items() if k not in RUN_OPTIONS}
    meta = dict(format=FORMAT, model=model, networks=sorted(tree),
                sources=sources)
    files.write_json(os.path.join(tmp, META), meta, default=_jsonable)
    # mkdtemp makes 0700: give the folders the mode the user's umask asks for.
    mode = files.user_mode()
    for root, dirs, _ in os.walk(tmp):
      for d in dirs:
        os.chmod(os.path.join(root, d), mode)
    os.chmod(tmp, mode)
    check_target(directory, force)  # again: the folder may have changed meanwhile
    if os.path.exists(directory):
      # The old folder goes into a temp folder of ours (never a fixed name like DIR.old,
      # which could be the user's), is replaced, and only then deleted.
      # Kept under its own name, so a run killed between the two renames leaves it where
      # the next save_weights finds and restores it (_recover_interrupted_replace).
      trash = files.make_temp_dir(parent, TEMP_PREFIX)
      os.rename(directory, os.path.join(trash, os.path.basename(directory)))
    os.rename(tmp, directory)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    old = trash and os.path.join(trash, os.path.basename(directory))
    if old and not os.path.exists(directory) and os.path.isdir(old):
      os.rename(old, directory)  # put the old weights back
    if isinstance(e, Exception) and disk_space.is_disk_full(e):
      need = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(tree))
      kept = ("the weights there are as they were" if os.path.exists(directory)
              else "nothing was written")
      raise disk_space.DiskFullError(
          f"no space left to write the weights to {directory}: they need about "
          f"{disk_space.mb(need)}, {disk_space.mb(disk_space.free_bytes(parent))} is free; "
          f"{kept}") from e
    raise
  finally:
    if trash and os.path.exists(directory):  # else it holds the only copy: left for the user
      shutil.rmtree(trash, ignore_errors=True)
  return directory


def _checkpointer():
  """An Orbax checkpointer of this process alone: weights are host arrays that one process
  writes (process 0 of a multi-process training) or each process reads by itself, with no
  barrier that would wait for the others."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def _recover_interrupted_replace(parent: str) -> None:
  """Puts back weights folders that a killed save_weights had moved aside (into a temp folder
  of a dead writer, under their own name) but not yet replaced; run before stale temp
  folders are removed, so those never hold the only copy."""
  for temp in files.stale_temp_dirs(parent, TEMP_PREFIX):
    for name in os.listdir(temp):
      old, target = os.path.join(temp, name), os.path.join(parent, name)
      if os.path.isfile(os.path.join(old, META)) and not os.path.lexists(target):
        os.rename(old, target)


def weights_dir(path: str) -> str:
  """A converted-weights directory, or a training workdir's latest weights (WORKDIR/weights)."""
  if (not os.path.exists(os.path.join(path, META))
      and os.path.exists(os.path.join(path, "weights", META))):
    return os.path.join(path, "weights")
  return path


def read_meta(directory: str) -> dict:
  """The JSON record of a weights directory (config, networks, sources)."""
  path = os.path.join(os.path.abspath(directory), META)
  if not os.path.isfile(path):
    raise WeightsError(f"{directory}: not a grain_jax weights directory (no {META}); "
                       f"make one with grain-jax convert")
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f"{path}: corrupt ({e})") from None
  if meta.get("format") not in (FORMAT, FORMAT_1):
    raise WeightsError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
  return meta


def load_weights(directory: str) -> tuple[dict, ml_collections.ConfigDict, dict]:
  """({network: variables}, model config, meta) of a converted-weights directory.

  Raises WeightsError for a directory that cannot be restored (missing or damaged files) and
  for weights holding NaN or infinity (naming the network and the parameter).
  """
  meta = read_meta(directory)
  path = os.path.join(os.path.abspath(directory), "variables")
  orbax_log_filter.silence_failed_read()
  try:
    tree = _checkpointer().restore(path)
  except Exception as e:
    raise WeightsError(f"{path}: cannot restore the weights ({restore_error(e)})") from None
  if meta["format"] == FORMAT_1:
    group = tree.pop("grain", {})
    for collection, by_name in group.items():
      for name, value in by_name.items():
        tree.setdefault(name, {})[collection] = value
  check_finite(tree, directory)
  cfg = ml_collections.ConfigDict(meta["model"])
  return tree, cfg, meta


def check_finite(tree: dict, directory: str = "weights") -> None:
  """Raises WeightsError naming the network and parameter of the first array of `tree`
  ({network: variables}) that holds NaN or infinity (e.g. exported by a diverged training)."""
  for key_path, a in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path]
      bad = int(a.size - np.isfinite(a).sum())
      raise WeightsError(f"{directory}: network '{keys[0]}' has {bad} non-finite values (NaN "
                         f"or infinity) in {'/'.join(keys[1:])}; these weights are unusable "
                         f"(from a diverged training?)")


def restore_error(e: BaseException) -> str:
  """The useful part of an Orbax/TensorStore restore error: its root cause's first line
  (Orbax wraps it in errors that append pages of TensorStore specs)."""
  while e.__cause__ is not None:
    e = e.__cause__
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {first.split(' See full TensorStore details')[0][:300]}"


def _jsonable(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")
