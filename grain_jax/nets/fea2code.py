"""Fea2Code: decoder feature maps -> W+ codes for the StyleGAN2 generator (GRAIN codeStyleGAN).

A pyramid of GradualStyleBlocks (pSp-style), one per pair of codes. With K decoder features
(coarsest first) and B = n_codes / 2 blocks, blocks B-K+1 .. B-1 each take one feature level
(finest for the last block) plus the stride-2 `conv_first` output of the block above them;
the B-K+1 lowest blocks all take features[0] plus that carry. Each block downsamples to
lr_size, then two heads of stride-2 convs (down to 1x1) and a Linear give its two codes. Code 2i comes from
the second head of block i, code 2i+1 from the first (the original reverses its list).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from grain_jax.nets.layers import TORCH_KERNEL_INIT, conv3x3, conv_weight_grad_of, lrelu
from grain_jax.nets.torch_import import TorchReader


class GradualStyleBlock(nn.Module):
  """One block: [conv_first + `n_down` convs] down to lr_size, then two code heads."""
  has_conv_first: bool
  n_down: int
  head_channels: Sequence[int]
  nf: int = 64
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: conv3x3(*a, **k, weight_grad=self.conv_weight_grad)
    carry = None
    if self.has_conv_first:
      x = carry = lrelu(conv(self.nf, 2, name="conv_first")(x))
      self.sow("intermediates", "fea", carry)
      for j in range(self.n_down):
        x = lrelu(conv(self.nf, 2, name=f"convs_{j}")(x))
    self.sow("intermediates", "x16", x)
    codes = []
    for head in (1, 2):
      y = x
      for j, c in enumerate(self.head_channels):
        y = lrelu(conv(c, 2, name=f"convs{head}_{j}")(y))
      self.sow("intermediates", f"x{head}", y)
      codes.append(nn.Dense(self.head_channels[-1], kernel_init=TORCH_KERNEL_INIT,
                            name=f"linear{head}")(y.reshape(y.shape[0], -1)))
    return codes[0], codes[1], carry


class Fea2Code(nn.Module):
  """features (list, coarsest first, all nf channels) -> raw codes (N, n_codes, style_dim)."""
  n_codes: int = 18
  n_levels: int = 7
  head_channels: Sequence[int] = (64, 128, 256, 512)
  nf: int = 64
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD

  @property
  def n_base(self) -> int:
    """Blocks that work on features[0] (3 in the 1024 config)."""
    return self.n_codes // 2 - (self.n_levels - 1)

  @nn.compact
  def __call__(self, features):
    if len(features) != self.n_levels:
      raise ValueError(f"Fea2Code expects {self.n_levels} feature maps, got {len(features)}")
    n_blocks = self.n_codes // 2
    nb = self.n_base
    if nb < 1:
      raise ValueError(f"{self.n_codes} codes cannot serve {self.n_levels} feature levels")
    out = [None] * n_blocks
    carry = None
    for i in reversed(range(n_blocks)):
      level = max(i - nb + 1, 0)
      x = features[level] if carry is None else features[level] + carry
      block = GradualStyleBlock(i >= nb, max(level - 1, 0), tuple(self.head_channels), self.nf,
                                self.conv_weight_grad, name=f"styles_{i}")
      c1, c2, fea = block(x)
      if i >= nb:
        carry = fea
      out[i] = (c2, c1)
    codes = [c for pair in out for c in pair]
    return jnp.stack(codes, axis=1)

  @classmethod
  def from_config(cls, cfg) -> "Fea2Code":
    n_levels = int(math.log2(cfg.hr_size // cfg.lr_size)) + 1
    n_codes = int(cfg.fea2code.get("n_codes", 0)) or n_latent(cfg.hr_size)
    if n_codes < n_latent(cfg.hr_size) or n_codes % 2:
      raise ValueError(f"fea2code.n_codes must be even and at least the generator's "
                       f"{n_latent(cfg.hr_size)} codes, got {n_codes}")
    head = tuple(cfg.fea2code.head_channels)
    if 2 ** len(head) < cfg.lr_size:
      raise ValueError(f"fea2code.head_channels needs at least log2(lr_size) = "
                       f"{int(math.log2(cfg.lr_size))} entries to reach 1x1, got {head}")
    if head[-1] != cfg.generator.style_dim:
      raise ValueError(f"the last fea2code head width ({head[-1]}) must equal "
                       f"generator.style_dim ({cfg.generator.style_dim})")
    return cls(n_codes, n_levels, head, cfg.rescaler.nf, conv_weight_grad_of(cfg))


def n_latent(size: int) -> int:
  """Number of W+ codes of a StyleGAN2 generator of this output size (18 at 1024)."""
  return 2 * int(math.log2(size)) - 2


def from_torch(rd: TorchReader, model: Fea2Code) -> dict:
  """GRAIN codeStyleGAN `encoder.*` (Fea2Code) state dict -> {'params': ...}.

  Keys of the generator copy inside codeStyleGAN_model.pt (`decoder.*`) are ignored, as the
  original does (it loads the generator from the StyleGAN2 file).
  """
  rd.ignore_prefix("decoder.")
  params = {}
  nb = model.n_base
  for i in range(model.n_codes // 2):
    key = f"encoder.styles.{i}"
    p = {}
    if i >= nb:
      p["conv_first"] = rd.conv(f"{key}.conv_first.0")
      for j in range(max(i - nb, 0)):
        p[f"convs_{j}"] = rd.conv(f"{key}.convs.{2 * j}")
    for head in (1, 2):
      for j in range(len(model.head_channels)):
        p[f"convs{head}_{j}"] = rd.conv(f"{key}.convs{head}.{2 * j}")
      p[f"linear{head}"] = rd.dense(f"{key}.linear{head}")
    params[f"styles_{i}"] = p
  return {"params": params}
