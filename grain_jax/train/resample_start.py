"""`init.resample_start`: fresh rescaler and Fusion weights that start as plain resamplers.

For training from scratch in a short budget (the CPU demo): the encoder starts as a box
(area) downscale and the decoder as a nearest-neighbour upscale whose last `smooth_levels`
x2 steps are bilinear (a [1, 2, 1]^2 / 16 filter after the pixel repetition), carried by
`n_signal` feature channels, and Fusion passes the decoder's image through. Every other
weight keeps its random value, and the last conv of every dense block starts at zero so
that each RRDB passes its input on (scaled by 1.2: `out * 0.2 + x`). Where LeakyReLUs follow
(the encoder, the decoder's and Fusion's output convs), the image is offset by +1
(images are in [-1, 1]) so they leave it unchanged; the decoder's feature maps carry the
image itself, so the smoothing's zero padding pulls the border towards grey, not black.
Smoothing the last two steps starts the demo's rescaler closer to bicubic in SSIM (0.508
instead of 0.485 on its held-out crops; bicubic: 0.515). Training then learns the
interpolation and what the LR can hide from this starting point instead of from noise.
"""
from __future__ import annotations

import jax
import numpy as np

CENTER = np.pad(np.ones((1, 1), np.float32), 1)  # a 3x3 kernel that copies its input
TENT = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16  # after x2 repetition: bilinear


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


def rescaler_start(params: dict, n_signal: int = 3, smooth_levels: int = 2) -> dict:
  """New rescaler (InvRRDB) params: box down in the encoder, nearest up in the decoder with
  the last `smooth_levels` x2 steps bilinear."""
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
  route(dec["conv_first"], CENTER)
  trunks = sorted((k for k in dec if k.endswith("_trunk_conv")),
                  key=lambda k: int(k[len("level"):k.index("_")]))
  for i, name in enumerate(trunks):
    if i > 0 and i >= len(trunks) - smooth_levels:
      # fea + conv(RRDBs(fea)) = tent * fea: the level's RRDBs each scale by 1.2.
      level = name[:name.index("_")]
      gain = 1.2 ** sum(1 for k in dec if k.startswith(f"{level}_RRDB_"))
      route(dec[name], (TENT - CENTER) / gain)
    else:
      route(dec[name], zero)
  route(dec["out_0"], CENTER, 1.0)
  route(dec["out_2"], CENTER)
  route(dec["out_4"], CENTER, -1.0)
  _zero_dense_block_outputs(p)
  return p


def fusion_start(params: dict, model, n_signal: int = 3) -> dict:
  """New Fusion params whose output starts as the full-resolution decoder feature's first
  `n_signal` channels, i.e. the image `rescaler_start`'s decoder carries (offset by +1 on
  its way through the LeakyReLUs).

  The signal's SE gates are fixed at sigmoid(0) = 1/2 (their fc2 rows are zero) and the next
  conv doubles it. `model` is the Fusion module (its widths locate the signal).
  """
  p = _numpy_copy(params)
  sig = np.arange(n_signal)
  p["se3"]["fc2"]["kernel"][..., sig] = 0.0
  route_signal(p["conv3_0"], sig, CENTER, bias=1.0, gain=2.0)
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
