"""Converted-weights directories: one Orbax checkpoint of every network plus the model config.

Layout of DIR (written by `grain-jax convert` and by training, read by grain_jax.load):
    DIR/grain_weights.json   format tag, model config, networks present, source files
    DIR/variables/           Orbax (StandardCheckpointer) tree {network: variables}, with the
                             network names of networks.py ('rescaler', 'generator', ...) and
                             each network's collections ('params'[, 'buffers' | 'batch_stats'])
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np

FORMAT = "grain_jax.weights/2"
# Format 1 kept the four model networks in one group: {'grain': {'params': {name: ...},
# 'buffers': {'generator': ...}}, other networks: ...}. It is still read.
FORMAT_1 = "grain_jax.weights/1"
META = "grain_weights.json"


class WeightsError(ValueError):
  """A weights directory that is missing, incomplete or of another kind."""


RUN_OPTIONS = ("compute_dtype", "remat")


def save_weights(directory: str, tree: dict, model_cfg: ml_collections.ConfigDict,
                 sources: dict[str, Any], force: bool = False) -> str:
  """Writes `tree` ({network: variables}) and its config to `directory`, atomically (temp
  dir, then rename); the networks present are recorded from the tree's keys.

  An existing directory is only replaced with force=True, and only after the new one is
  completely written, so a failure never loses the old weights.
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not force:
    raise FileExistsError(f"{directory} exists; pass --force to replace it")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".grain_weights-", dir=parent)
  try:
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a), tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "variables"), tree)
    ckptr.wait_until_finished()
    # compute_dtype and remat are choices of how to run, not part of the weights.
    model = {k: v for k, v in model_cfg.to_dict().items() if k not in RUN_OPTIONS}
    meta = dict(format=FORMAT, model=model, networks=sorted(tree),
                sources=sources)
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=1, default=_jsonable)
    if os.path.exists(directory):
      old = directory + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


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
  """({network: variables}, model config, meta) of a converted-weights directory."""
  import orbax.checkpoint as ocp

  meta = read_meta(directory)
  path = os.path.join(os.path.abspath(directory), "variables")
  try:
    tree = ocp.StandardCheckpointer().restore(path)
  except Exception as e:
    raise WeightsError(f"{path}: cannot restore the weights ({type(e).__name__}: {e})") from None
  if meta["format"] == FORMAT_1:
    group = tree.pop("grain", {})
    for collection, by_name in group.items():
      for name, value in by_name.items():
        tree.setdefault(name, {})[collection] = value
  cfg = ml_collections.ConfigDict(meta["model"])
  return tree, cfg, meta


def _jsonable(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")
