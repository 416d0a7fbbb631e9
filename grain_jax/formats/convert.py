"""Converts PyTorch checkpoints into one grain_jax weights directory:

    grain-jax convert --stylegan2 stylegan2-ffhq-config-f.pt --discriminator mul_res_gan2.pt \\
        --invrrdb invRRDB_model.pt --codestylegan codeStyleGAN_model.pt \\
        --fusion Fusion_model.pt --irse50 model_ir_se50.pth --lpips builtin --out weights/grain1024

Give any subset of the files; grain_jax.load(DIR) then offers the methods they allow
(upscale needs --stylegan2, --invrrdb, --codestylegan and --fusion). The model config
(default: the built-in 1024, the published 1024 <-> 16 GRAIN) is stored in DIR; override its
fields with e.g. --config.model.hr_size=256; a StyleGAN2-ADA .pkl (--stylegan2,
--discriminator) sets the StyleGAN2's widths, mapping depth and conv_clamp from the file.
Files are read with torch.load(weights_only=True), and .pkl files by an unpickler that
allows tensors and plain containers only: a checkpoint cannot run code. Nothing is written
unless every file converts; missing, unknown and misshaped keys are named. (Each file is
converted by its network's row in nets/registry.py, checked against the configured model.)
"""
from __future__ import annotations

import hashlib
import os

from grain_jax.formats.weights import check_target, save_weights
from grain_jax.nets import registry


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert(model_cfg, sources: dict[str, str]) -> tuple[dict, dict, object]:
  """Converts {network name: option value} (see registry.NETWORKS; e.g. {'generator':
  'stylegan2-ffhq-config-f.pt', 'lpips': 'builtin'}); returns ({network: variables},
  {network: [{path, sha256}]}, the model config they were converted for: `model_cfg` with
  what StyleGAN2-ADA pickles fix, see registry.config_for_sources)."""
  sources = {name: src for name, src in sources.items() if src}
  if not sources:
    raise ValueError("nothing to convert: give at least one checkpoint file")
  model_cfg = registry.config_for_sources(model_cfg, sources)
  tree, record = {}, {}
  for name, src in sources.items():
    tree[name], files = registry.convert(name, src, model_cfg)
    record[name] = [dict(path=os.path.abspath(p), sha256=sha256_file(p)) for p in files]
  return tree, record, model_cfg


def convert_and_save(out_dir: str, model_cfg, sources: dict[str, str],
                     force: bool = False) -> str:
  """convert() then save_weights() with the config it returns; an existing weights out_dir
  needs force=True, and a folder that is not a weights folder is never replaced
  (check_target)."""
  # Checked before converting (which can take minutes), and again when writing.
  check_target(out_dir, force)
  tree, record, model_cfg = convert(model_cfg, sources)
  return save_weights(out_dir, tree, model_cfg, record, force=force)
