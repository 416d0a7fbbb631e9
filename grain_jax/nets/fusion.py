"""Fusion: merges the rescaler's and the generator's features into the final HR image.

GRAIN models/feaFusion.py: at each of the last three resolutions (R/4, R/2, R) the decoder
feature and the StyleGAN2 feature are concatenated (decoder first), squeeze-excited and
convolved; the three branches are brought to R by nearest upsampling (x4, x2), concatenated,
squeeze-excited again and convolved down to RGB (no output activation).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from grain_jax.nets.layers import (SqueezeExcite, conv3x3, conv_weight_grad_of, lrelu,
                                   upsample_nearest)
from grain_jax.nets.torch_import import TorchReader


class Fusion(nn.Module):
  """(decoder features, G features) at R/4, R/2, R -> RGB image at R.

  `branch_widths[k]` are the two conv widths of branch k; `out_widths` those of the head.
  """
  branch_widths: Sequence[Sequence[int]] = ((128, 128), (64, 64), (32, 32))
  out_widths: Sequence[int] = (128, 128, 64, 64)
  se_reduction: int = 16
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD (the SE blocks' 1x1 convs stay XLA's)

  @nn.compact
  def __call__(self, dec_features, g_features):
    conv = lambda *a, **k: conv3x3(*a, **k, weight_grad=self.conv_weight_grad)
    dec_features, g_features = list(dec_features)[-3:], list(g_features)[-3:]
    zs = []
    for k, (x, y) in enumerate(zip(dec_features, g_features)):
      z = SqueezeExcite(self.se_reduction, name=f"se{k + 1}")(jnp.concatenate([x, y], -1))
      for j, c in enumerate(self.branch_widths[k]):
        z = lrelu(conv(c, name=f"conv{k + 1}_{2 * j}")(z))
      zs.append(upsample_nearest(z, 2 ** (2 - k)) if k < 2 else z)
    z = SqueezeExcite(self.se_reduction, name="se4")(jnp.concatenate(zs, -1))
    for j, c in enumerate(self.out_widths):
      z = lrelu(conv(c, name=f"out_{2 * j}")(z))
    return conv(3, name=f"out_{2 * len(self.out_widths)}")(z)

  @classmethod
  def from_config(cls, cfg) -> "Fusion":
    f = cfg.fusion
    # remat: the whole network is recomputed in the backward pass (its full-resolution
    # activations are then not held alongside the rest of the model's); same params.
    klass = nn.remat(cls) if cfg.get("remat", False) else cls
    return klass(tuple(tuple(b) for b in f.branch_widths), tuple(f.out_widths), f.se_reduction,
                 conv_weight_grad_of(cfg))


def from_torch(rd: TorchReader, model: Fusion) -> dict:
  """GRAIN Fusion_model.pt state dict -> {'params': ...}."""
  params = {}
  for k in range(4):
    params[f"se{k + 1}"] = {"fc1": rd.conv(f"se{k + 1}.fc1", bias=False),
                            "fc2": rd.conv(f"se{k + 1}.fc2", bias=False)}
  for k in range(3):
    for j in range(len(model.branch_widths[k])):
      params[f"conv{k + 1}_{2 * j}"] = rd.conv(f"conv{k + 1}.{2 * j}")
  for j in range(len(model.out_widths) + 1):
    params[f"out_{2 * j}"] = rd.conv(f"out.{2 * j}")
  return {"params": params}
