"""`init.resample_start`: fresh rescaler and Fusion weights that start as plain resamplers.

For training from scratch in a short budget (the CPU demo): the encoder starts as a box
(area) downscale and the decoder as a nearest-neighbour upscale, carried by `n_signal`
feature channels, and Fusion passes the decoder's image through. Every other weight keeps
its random value, and the last conv of every dense block starts at zero so that each RRDB
starts as the identity (the usual zero-init of residual branches). The carried signal is
offset by +1 (images are in [-1, 1]), so the LeakyReLUs on its way leave it unchanged.
Training then learns the interpolation and what the LR can hide from this starting point
instead of from noise.
"""
from __future__ import annotations

import jax
import numpy as np

CENTER = np.pad(np.ones((1, 1), np.float32), 1)  # a 3x3 kernel that copies its input


def route_signal(conv: dict, channels, taps, bias: float = 0.0, src=None, gain: float = 1.0):
  """Makes output channel c of a 3x3 conv (numpy params, HWIO) read only input channel
  src[c] through `taps` * gain, with `bias`; other outputs keep their weights."""
  src = channels if src is None else src
  k = conv["kernel"]
  k[:, :, :, channels] = 0.0
  k[:, :, src, channels] = np.asarray(taps, np.float32)[:, :, None] * gain
  conv["bias"][channels] = bias


def _numpy_copy(params: dict) -> dict:
  return jax.tree_util.tree_map(lambda a: np.array(a, np.float32), params)


def _zero_dense_block_outputs(tree: dict) -> None:
  for name, sub in tree.items():
    if name.startswith("RDB"):
      last = max((k for k in sub if k.startswith("conv")), key=lambda k: int(k[4:]))
      sub[last]["kernel"][:] = 0.0
      sub[last]["bias"][:] = 0.0
    elif isinstance(sub, dict):
      _zero_dense_block_outputs(sub)


def rescaler_start(params: dict, n_signal: int = 3) -> dict:
  """New rescaler (InvRRDB) params: box down in the encoder, nearest up in the decoder."""
  p = _numpy_copy(params)
  route = lambda conv, taps, bias=0.0: route_signal(conv, np.arange(n_signal), taps, bias)
  box = np.zeros((3, 3), np.float32)  # stride 2, padding 1: rows 2i, 2i+1 of the input
  box[1:, 1:] = 0.25
  zero = np.zeros((3, 3), np.float32)
  enc, dec = p["encoder"], p["decoder"]
  route(enc["conv_first"], CENTER, 1.0)
  for name in sorted(k for k in enc if k.startswith("body_")):
    route(enc[name], box)
  route(enc["trunk_conv"], zero)
  route(enc["out_0"], CENTER)
  route(enc["out_2"], CENTER, -1.0)
  route(dec["conv_first"], CENTER, 1.0)
  for name in (k for k in dec if k.endswith("_trunk_conv")):
    route(dec[name], zero)
  route(dec["out_0"], CENTER)
  route(dec["out_2"], CENTER)
  route(dec["out_4"], CENTER, -1.0)
  _zero_dense_block_outputs(p)
  return p


def fusion_start(params: dict, model, n_signal: int = 3) -> dict:
  """New Fusion params whose output starts as the full-resolution decoder feature's first
  `n_signal` channels minus 1, i.e. the image `rescaler_start`'s decoder carries.

  The signal's SE gates are fixed at sigmoid(0) = 1/2 (their fc2 rows are zero) and the next
  conv doubles it. `model` is the Fusion module (its widths locate the signal).
  """
  p = _numpy_copy(params)
  sig = np.arange(n_signal)
  p["se3"]["fc2"]["kernel"][..., sig] = 0.0
  route_signal(p["conv3_0"], sig, CENTER, gain=2.0)
  for j in range(1, len(model.branch_widths[2])):
    route_signal(p[f"conv3_{2 * j}"], sig, CENTER)
  offset = model.branch_widths[0][-1] + model.branch_widths[1][-1]  # z3 in concat(z1, z2, z3)
  p["se4"]["fc2"]["kernel"][..., offset + sig] = 0.0
  route_signal(p["out_0"], sig, CENTER, src=offset + sig, gain=2.0)
  n_out = len(model.out_widths)
  for j in range(1, n_out):
    route_signal(p[f"out_{2 * j}"], sig, CENTER)
  route_signal(p[f"out_{2 * n_out}"], sig, CENTER, bias=-1.0)
  return p
