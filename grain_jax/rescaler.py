"""The invertible rescaler of GRAIN (invRRDB): encoder HR -> LR, 8-bit quantizer, decoder LR -> HR.

Layout and names follow GRAIN's models/invRRDB.py (RRDBEncNet / RRDBDecNet). Sizes come from
the configuration: the encoder has log2(hr/lr) stride-2 levels and the decoder one level per
resolution from lr to hr, each keeping its output as a feature map for Fea2Code and Fusion.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.torch_import import TorchReader, check_tree


def lrelu(x):
  return jax.nn.leaky_relu(x, 0.2)


# PyTorch's default Conv2d / Linear weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)),
# a third of Flax's default variance. GRAIN trains from it; with Flax's larger default the
# stacked dense blocks start with much larger activations and train more slowly.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def conv3x3(features: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  """nn.Conv2d(k=3, padding=1) with bias, in NHWC, with PyTorch's weight initialisation."""
  return nn.Conv(features, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                 kernel_init=TORCH_KERNEL_INIT, name=name)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
  return x.reshape(n, h * factor, w * factor, c)


# ------------------------------------------------------------------------------ quantizer

def to_levels(x: jax.Array) -> jax.Array:
  """[-1, 1] -> the 0..255 scale, in the original's order of operations."""
  return (x + 1.0) / 2.0 * 255.0


def from_levels(v: jax.Array) -> jax.Array:
  return (v / 255.0 - 0.5) / 0.5


# The 256 LR values exactly as the original computes them in float32. XLA may rewrite
# `v / 255` as `v * (1/255)`, which is off by an ulp; a table keeps 8-bit LR images bit-exact.
LEVEL_VALUES = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5))
                / np.float32(0.5)).astype(np.float32)


def quantize(x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """GRAIN's quantizer: exactly 8-bit values at inference, uniform noise in training.

  With `rng=None`, rounds to the 8-bit grid (half to even) and clamps to [0, 255]: the LR
  image is then exactly what an 8-bit PNG stores. With an rng, adds U(-0.5, 0.5) on the
  0..255 scale and clamps (the training form; gradients flow through the noise).
  """
  if rng is None:
    idx = jnp.clip(jnp.round(to_levels(x)), 0, 255).astype(jnp.int32)
    return jnp.asarray(LEVEL_VALUES, x.dtype)[idx]
  return quantize_with_noise(x, jax.random.uniform(rng, x.shape, x.dtype, -0.5, 0.5))


def quantize_with_noise(x: jax.Array, noise: jax.Array) -> jax.Array:
  """The training quantizer with given U(-0.5, 0.5) noise (on the 0..255 scale), clamped."""
  return from_levels(jnp.clip(to_levels(x) + noise, 0.0, 255.0))


def lr_to_uint8(lr: jax.Array) -> np.ndarray:
  """A quantized LR image in [-1, 1] as uint8 (exact: lr holds 8-bit levels)."""
  return np.asarray(np.clip(np.round(to_levels(np.asarray(lr, np.float32))), 0, 255), np.uint8)


def uint8_to_lr(u8: np.ndarray) -> np.ndarray:
  """uint8 pixels -> [-1, 1] float32, the values `quantize` produces for those levels."""
  return LEVEL_VALUES[np.asarray(u8, np.uint8)]


# ------------------------------------------------------------------------------ blocks

class ResidualDenseBlock(nn.Module):
  """RDB with `n_convs` (5 = ResidualDenseBlock_5C, 4 = _4C): dense concatenation, x5*0.2 + x."""
  nf: int = 64
  gc: int = 32
  n_convs: int = 5

  @nn.compact
  def __call__(self, x):
    feats = [x]
    for i in range(1, self.n_convs):
      y = conv3x3(self.gc, name=f"conv{i}")(jnp.concatenate(feats, -1) if i > 1 else x)
      feats.append(lrelu(y))
    out = conv3x3(self.nf, name=f"conv{self.n_convs}")(jnp.concatenate(feats, -1))
    return out * 0.2 + x


class RRDB(nn.Module):
  """Residual in residual dense block: three RDB5C (`light=False`) or one RDB4C (RRDB2)."""
  nf: int = 64
  gc: int = 32
  light: bool = False

  @nn.compact
  def __call__(self, x):
    out = x
    if self.light:
      out = ResidualDenseBlock(self.nf, self.gc, 4, name="RDB1")(out)
    else:
      for i in range(1, 4):
        out = ResidualDenseBlock(self.nf, self.gc, 5, name=f"RDB{i}")(out)
    return out * 0.2 + x


def rrdb_class(remat: bool):
  """RRDB, or RRDB under jax.checkpoint (rematerialised in the backward pass; same params)."""
  return nn.remat(RRDB) if remat else RRDB


class Encoder(nn.Module):
  """RRDBEncNet: conv, n_down x [3x3 stride-2 conv + LReLU], RRDB trunk, conv-LReLU-conv to 3."""
  n_down: int = 6
  nf: int = 64
  gc: int = 32
  n_blocks: int = 10
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    fea = conv3x3(self.nf, name="conv_first")(x)
    for i in range(self.n_down):
      fea = lrelu(conv3x3(self.nf, 2, name=f"body_{i}")(fea))
    trunk = fea
    for i in range(self.n_blocks):
      trunk = rrdb_class(self.remat)(self.nf, self.gc, name=f"RRDB_trunk_{i}")(trunk)
    fea = fea + conv3x3(self.nf, name="trunk_conv")(trunk)
    out = lrelu(conv3x3(self.nf, name="out_0")(fea))
    return conv3x3(3, name="out_2")(out)


class Decoder(nn.Module):
  """RRDBDecNet: one level per resolution (coarsest first), x2 nearest upsampling between.

  `blocks[i]` = number of RRDBs at level i; the last `light_levels` levels use one RRDB2
  each (1024 config: blocks (3,3,3,2,1), light_levels 2, as in the original).
  Returns (hr_inv, features) with features[i] the level-i feature map (nf channels).
  """
  blocks: Sequence[int] = (3, 3, 3, 2, 1)
  light_levels: int = 2
  nf: int = 64
  gc: int = 32
  remat: bool = False

  @nn.compact
  def __call__(self, lr):
    fea = conv3x3(self.nf, name="conv_first")(lr)
    specs = [(n, False) for n in self.blocks] + [(1, True)] * self.light_levels
    features = []
    for level, (n, light) in enumerate(specs):
      if level > 0:
        fea = upsample_nearest(fea)
      trunk = fea
      for j in range(n):
        trunk = rrdb_class(self.remat)(self.nf, self.gc, light,
                                       name=f"level{level}_RRDB_{j}")(trunk)
      fea = fea + conv3x3(self.nf, name=f"level{level}_trunk_conv")(trunk)
      features.append(fea)
    out = lrelu(conv3x3(self.nf, name="out_0")(fea))
    out = lrelu(conv3x3(self.nf // 2, name="out_2")(out))
    return conv3x3(3, name="out_4")(out), features


class Rescaler(nn.Module):
  """InvRRDB: `encode` (HR -> float LR), `decode` (LR -> hr_inv, features)."""
  n_down: int = 6
  nf: int = 64
  gc: int = 32
  encoder_blocks: int = 10
  decoder_blocks: Sequence[int] = (3, 3, 3, 2, 1)
  decoder_light_levels: int = 2
  remat: bool = False  # rematerialise each RRDB in the backward pass (less memory, ~1/3 more compute)

  def setup(self):
    self.encoder = Encoder(self.n_down, self.nf, self.gc, self.encoder_blocks, self.remat)
    self.decoder = Decoder(tuple(self.decoder_blocks), self.decoder_light_levels, self.nf, self.gc,
                           self.remat)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, lr):
    return self.decoder(lr)

  def __call__(self, x, rng=None):
    """x -> (lr_float, lr, hr_inv, features); `rng` switches the quantizer to training noise."""
    lr_float = self.encode(x)
    lr = quantize(lr_float, rng)
    hr_inv, features = self.decode(lr)
    return lr_float, lr, hr_inv, features

  @classmethod
  def from_config(cls, cfg) -> "Rescaler":
    """Builds the rescaler of a model config (see configs/)."""
    n_down = int(round(np.log2(cfg.hr_size / cfg.lr_size)))
    if cfg.lr_size * 2 ** n_down != cfg.hr_size:
      raise ValueError(f"hr_size / lr_size must be a power of 2, got {cfg.hr_size} / {cfg.lr_size}")
    r = cfg.rescaler
    if len(r.decoder_blocks) + r.decoder_light_levels != n_down + 1:
      raise ValueError(
          f"the decoder needs one level per resolution from {cfg.lr_size} to {cfg.hr_size} "
          f"({n_down + 1}), config gives {len(r.decoder_blocks)} + {r.decoder_light_levels}")
    return cls(n_down, r.nf, r.gc, r.encoder_blocks, tuple(r.decoder_blocks), r.decoder_light_levels,
               bool(cfg.get("remat", False)))


# ------------------------------------------------------------------------------ conversion

def _rdb_from_torch(rd: TorchReader, key: str, n_convs: int) -> dict:
  return {f"conv{i}": rd.conv(f"{key}.conv{i}") for i in range(1, n_convs + 1)}


def _rrdb_from_torch(rd: TorchReader, key: str, light: bool) -> dict:
  if light:
    return {"RDB1": _rdb_from_torch(rd, f"{key}.RDB1", 4)}
  return {f"RDB{i}": _rdb_from_torch(rd, f"{key}.RDB{i}", 5) for i in range(1, 4)}


def params_from_torch(state_dict: dict, model: Rescaler) -> dict:
  """GRAIN invRRDB state dict (`enc.*`, `dec.*`) -> {'params': ...} for `model`.

  The original's decoder names its levels by their 1024-config resolution
  (RRDB_trunk16 ... RRDB_trunk1024), whatever size it runs at; level i is `16 * 2**i`.
  """
  rd = TorchReader(state_dict, "invRRDB")
  enc = {"conv_first": rd.conv("enc.conv_first"), "trunk_conv": rd.conv("enc.trunk_conv"),
         "out_0": rd.conv("enc.out.0"), "out_2": rd.conv("enc.out.2")}
  for i in range(model.n_down):
    enc[f"body_{i}"] = rd.conv(f"enc.body.{i}.0")
  for i in range(model.encoder_blocks):
    enc[f"RRDB_trunk_{i}"] = _rrdb_from_torch(rd, f"enc.RRDB_trunk.{i}", False)
  dec = {"conv_first": rd.conv("dec.conv_first"), "out_0": rd.conv("dec.out.0"),
         "out_2": rd.conv("dec.out.2"), "out_4": rd.conv("dec.out.4")}
  specs = [(n, False) for n in model.decoder_blocks] + [(1, True)] * model.decoder_light_levels
  for level, (n, light) in enumerate(specs):
    res = 16 * 2 ** level
    for j in range(n):
      dec[f"level{level}_RRDB_{j}"] = _rrdb_from_torch(rd, f"dec.RRDB_trunk{res}.{j}", light)
    dec[f"level{level}_trunk_conv"] = rd.conv(f"dec.trunk_conv{res}")
  params = {"encoder": enc, "decoder": dec}
  hr = 4 * 2 ** model.n_down  # Any size works: the networks are fully convolutional.
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, hr, hr, 3)))
  check_tree("invRRDB", params, expected["params"], rd)
  return {"params": params}


# ------------------------------------------------------------------------------ initialisation

CENTER = np.pad(np.ones((1, 1), np.float32), 1)  # a 3x3 kernel that copies its input


def route_signal(conv: dict, channels, taps, bias: float = 0.0, src=None, gain: float = 1.0):
  """Makes output channel c of a 3x3 conv (numpy params, HWIO) read only input channel
  src[c] through `taps` * gain, with `bias`; other outputs keep their weights."""
  src = channels if src is None else src
  k = conv["kernel"]
  k[:, :, :, channels] = 0.0
  k[:, :, src, channels] = np.asarray(taps, np.float32)[:, :, None] * gain
  conv["bias"][channels] = bias


def resample_init(params: dict, n_signal: int = 3) -> dict:
  """Sets freshly initialised rescaler params so the network starts as a plain resampler.

  For training from scratch in a short budget (the CPU demo): the encoder starts as a box
  (area) downscale and the decoder as a nearest-neighbour upscale, carried by `n_signal`
  feature channels; every other weight keeps its random value, and the last conv of every
  dense block starts at zero so that each RRDB starts as the identity (the usual zero-init
  of residual branches). The carried signal is offset by +1 (images are in [-1, 1]), so the
  LeakyReLUs on its way leave it unchanged. Training then learns the interpolation and
  what the LR can hide from this starting point instead of from noise. Returns new params.
  (fusion.resample_init continues the signal through Fusion.)
  """
  p = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), params)
  route = lambda conv, taps, bias=0.0: route_signal(conv, np.arange(n_signal), taps, bias)
  box = np.zeros((3, 3), np.float32)  # stride 2, padding 1: rows 2i, 2i+1 of the input
  box[1:, 1:] = 0.25
  center, zero = CENTER, np.zeros((3, 3), np.float32)

  def zero_rdb_outputs(tree):
    for name, sub in tree.items():
      if name.startswith("RDB"):
        last = max((k for k in sub if k.startswith("conv")), key=lambda k: int(k[4:]))
        sub[last]["kernel"][:] = 0.0
        sub[last]["bias"][:] = 0.0
      elif isinstance(sub, dict):
        zero_rdb_outputs(sub)

  enc, dec = p["encoder"], p["decoder"]
  route(enc["conv_first"], center, 1.0)
  for name in sorted(k for k in enc if k.startswith("body_")):
    route(enc[name], box)
  route(enc["trunk_conv"], zero)
  route(enc["out_0"], center)
  route(enc["out_2"], center, -1.0)
  route(dec["conv_first"], center, 1.0)
  for name in (k for k in dec if k.endswith("_trunk_conv")):
    route(dec[name], zero)
  route(dec["out_0"], center)
  route(dec["out_2"], center)
  route(dec["out_4"], center, -1.0)
  zero_rdb_outputs(p)
  return p
