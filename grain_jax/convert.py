"""PyTorch checkpoints -> one grain_jax weights directory (`grain-jax convert`).

Every file is read with torch.load(weights_only=True) (no pickled code runs) and converted by
its network's entry in networks.py, checked against the configured model; all files are
converted before anything is written.
"""
from __future__ import annotations

import hashlib
import os

from grain_jax import networks
from grain_jax import weights as weights_lib


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert(model_cfg, sources: dict[str, str]) -> tuple[dict, dict]:
  """Converts {network name: option value} (see networks.NETWORKS; e.g. {'generator':
  'stylegan2-ffhq-config-f.pt', 'lpips': 'builtin'}); returns ({network: variables},
  {network: [{path, sha256}]})."""
  sources = {name: src for name, src in sources.items() if src}
  if not sources:
    raise ValueError("nothing to convert: give at least one checkpoint file")
  tree, record = {}, {}
  for name, src in sources.items():
    tree[name], files = networks.convert(name, src, model_cfg)
    record[name] = [dict(path=os.path.abspath(p), sha256=sha256_file(p)) for p in files]
  return tree, record


def convert_and_save(out_dir: str, model_cfg, sources: dict[str, str],
                     force: bool = False) -> str:
  """convert() then weights.save_weights(); an existing weights out_dir needs force=True,
  and a folder that is not a weights folder is never replaced (weights.check_target)."""
  # Checked before converting (which can take minutes), and again when writing.
  weights_lib.check_target(out_dir, force)
  tree, record = convert(model_cfg, sources)
  return weights_lib.save_weights(out_dir, tree, model_cfg, record, force=force)
