"""GRAIN's invertible rescaler (invRRDB): encoder HR -> LR, decoder LR -> HR, and its converter.

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

from grain_jax.nets.layers import conv3x3, conv_weight_grad_of, lrelu, upsample_nearest
from grain_jax.nets.quantizer import quantize
from grain_jax.nets.torch_import import TorchReader


# ------------------------------------------------------------------------------ blocks

class ResidualDenseBlock(nn.Module):
  """RDB with `n_convs` (5 = ResidualDenseBlock_5C, 4 = _4C): dense concatenation, x5*0.2 + x."""
  nf: int = 64
  gc: int = 32
  n_convs: int = 5
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD

  @nn.compact
  def __call__(self, x):
    wg = self.conv_weight_grad
    feats = [x]
    for i in range(1, self.n_convs):
      y = conv3x3(self.gc, name=f"conv{i}", weight_grad=wg)(
          jnp.concatenate(feats, -1) if i > 1 else x)
      feats.append(lrelu(y))
    out = conv3x3(self.nf, name=f"conv{self.n_convs}", weight_grad=wg)(jnp.concatenate(feats, -1))
    return out * 0.2 + x


class RRDB(nn.Module):
  """Residual in residual dense block: three RDB5C (`light=False`) or one RDB4C (RRDB2)."""
  nf: int = 64
  gc: int = 32
  light: bool = False
  conv_weight_grad: str = "xla"

  @nn.compact
  def __call__(self, x):
    out = x
    wg = self.conv_weight_grad
    if self.light:
      out = ResidualDenseBlock(self.nf, self.gc, 4, wg, name="RDB1")(out)
    else:
      for i in range(1, 4):
        out = ResidualDenseBlock(self.nf, self.gc, 5, wg, name=f"RDB{i}")(out)
    return out * 0.2 + x


def run_blocks(parent: nn.Module, block: type[nn.Module], fields: dict, names: Sequence[str], x,
               remat: bool, scan: bool):
  """x through the same-shaped blocks `names` (children of `parent`: `block(**fields)`) in
  order; with `scan`, as one lax.scan over their stacked parameters.

  A compiler then sees one block instead of len(names): the TPU compiler's time grows with
  the number of kernels it generates. The parameters keep their per-block names (the
  stacking happens inside the program, and its gradient unstacks), so checkpoints and
  converted weights are the same either way, and so are the operations each block runs.
  """
  if not scan or len(names) < 2 or parent.is_initializing():
    klass = nn.remat(block) if remat else block
    for name in names:
      x = klass(**fields, name=name)(x)
    return x
  params = parent.variables["params"]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(params[n] for n in names))
  unbound = block(**fields, parent=None)

  def body(h, p):
    return unbound.apply({"params": p}, h), None
  if remat:
    body = jax.checkpoint(body)
  return jax.lax.scan(body, x, stacked)[0]


class Encoder(nn.Module):
  """RRDBEncNet: conv, n_down x [3x3 stride-2 conv + LReLU], RRDB trunk, conv-LReLU-conv to 3."""
  n_down: int = 6
  nf: int = 64
  gc: int = 32
  n_blocks: int = 10
  remat: bool = False
  conv_weight_grad: str = "xla"
  scan_blocks: bool = False  # the RRDB trunk as one lax.scan (run_blocks)

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: conv3x3(*a, **k, weight_grad=self.conv_weight_grad)
    fea = conv(self.nf, name="conv_first")(x)
    for i in range(self.n_down):
      fea = lrelu(conv(self.nf, 2, name=f"body_{i}")(fea))
    fields = dict(nf=self.nf, gc=self.gc, conv_weight_grad=self.conv_weight_grad)
    trunk = run_blocks(self, RRDB, fields, [f"RRDB_trunk_{i}" for i in range(self.n_blocks)], fea,
                       self.remat, self.scan_blocks)
    fea = fea + conv(self.nf, name="trunk_conv")(trunk)
    out = lrelu(conv(self.nf, name="out_0")(fea))
    return conv(3, name="out_2")(out)


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
  conv_weight_grad: str = "xla"
  scan_blocks: bool = False  # each level's RRDBs as one lax.scan (run_blocks)

  @nn.compact
  def __call__(self, lr):
    conv = lambda *a, **k: conv3x3(*a, **k, weight_grad=self.conv_weight_grad)
    fea = conv(self.nf, name="conv_first")(lr)
    specs = [(n, False) for n in self.blocks] + [(1, True)] * self.light_levels
    features = []
    for level, (n, light) in enumerate(specs):
      if level > 0:
        fea = upsample_nearest(fea)
      fields = dict(nf=self.nf, gc=self.gc, light=light, conv_weight_grad=self.conv_weight_grad)
      trunk = run_blocks(self, RRDB, fields, [f"level{level}_RRDB_{j}" for j in range(n)], fea,
                         self.remat, self.scan_blocks)
      fea = fea + conv(self.nf, name=f"level{level}_trunk_conv")(trunk)
      features.append(fea)
    out = lrelu(conv(self.nf, name="out_0")(fea))
    out = lrelu(conv(self.nf // 2, name="out_2")(out))
    return conv(3, name="out_4")(out), features


# The original's decoder blocks per level (16 ... 256 px in the 1024 config).
ORIGINAL_DECODER_BLOCKS = (3, 3, 3, 2, 1)


def decoder_blocks(cfg, n_levels: int) -> tuple[int, ...]:
  """rescaler.decoder_blocks of a model config; () = the original's, fitted to the levels."""
  blocks = tuple(cfg.rescaler.decoder_blocks)
  if blocks:
    return blocks
  heavy = max(n_levels - int(cfg.rescaler.decoder_light_levels), 0)
  return (ORIGINAL_DECODER_BLOCKS + (1,) * heavy)[:heavy]


class InvRRDB(nn.Module):
  """The rescaler: `encode` (HR -> float LR), `decode` (LR -> hr_inv, features)."""
  n_down: int = 6
  nf: int = 64
  gc: int = 32
  encoder_blocks: int = 10
  decoder_blocks: Sequence[int] = (3, 3, 3, 2, 1)
  decoder_light_levels: int = 2
  remat: bool = False  # rematerialise each RRDB in the backward pass (less memory, ~1/3 more compute)
  conv_weight_grad: str = "xla"  # how conv weight gradients are computed (layers.CONV_WEIGHT_GRAD)
  scan_blocks: bool = False  # runs of same-shaped RRDBs as one lax.scan each (fewer kernels)

  def setup(self):
    self.encoder = Encoder(self.n_down, self.nf, self.gc, self.encoder_blocks, self.remat,
                           self.conv_weight_grad, self.scan_blocks)
    self.decoder = Decoder(tuple(self.decoder_blocks), self.decoder_light_levels, self.nf, self.gc,
                           self.remat, self.conv_weight_grad, self.scan_blocks)

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
  def from_config(cls, cfg) -> "InvRRDB":
    """Builds the rescaler of a model config (nets/model_config.py)."""
    n_down = int(round(np.log2(cfg.hr_size / cfg.lr_size)))
    if cfg.lr_size * 2 ** n_down != cfg.hr_size:
      raise ValueError(f"hr_size / lr_size must be a power of 2, got {cfg.hr_size} / {cfg.lr_size}")
    r = cfg.rescaler
    blocks = decoder_blocks(cfg, n_down + 1)
    if len(blocks) + r.decoder_light_levels != n_down + 1:
      raise ValueError(
          f"the decoder needs one level per resolution from {cfg.lr_size} to {cfg.hr_size} "
          f"({n_down + 1}), model.rescaler gives {len(blocks)} decoder_blocks + "
          f"{r.decoder_light_levels} decoder_light_levels (decoder_blocks=() fits them)")
    return cls(n_down, r.nf, r.gc, r.encoder_blocks, blocks, r.decoder_light_levels,
               bool(cfg.get("remat", False)), conv_weight_grad_of(cfg),
               bool(cfg.get("scan_blocks", False)))


# ------------------------------------------------------------------------------ conversion

def _rdb_from_torch(rd: TorchReader, key: str, n_convs: int) -> dict:
  return {f"conv{i}": rd.conv(f"{key}.conv{i}") for i in range(1, n_convs + 1)}


def _rrdb_from_torch(rd: TorchReader, key: str, light: bool) -> dict:
  if light:
    return {"RDB1": _rdb_from_torch(rd, f"{key}.RDB1", 4)}
  return {f"RDB{i}": _rdb_from_torch(rd, f"{key}.RDB{i}", 5) for i in range(1, 4)}


def from_torch(rd: TorchReader, model: InvRRDB) -> dict:
  """GRAIN invRRDB state dict (`enc.*`, `dec.*`) -> {'params': ...} for `model`.

  The original's decoder names its levels by their 1024-config resolution
  (RRDB_trunk16 ... RRDB_trunk1024), whatever size it runs at; level i is `16 * 2**i`.
  """
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
  return {"params": {"encoder": enc, "decoder": dec}}
