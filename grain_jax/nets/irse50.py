"""ArcFace IR-SE50 identity network (TreB1eN / pSp layout, as used by GRAIN's IDLoss).

Mirrors GRAIN `models/model_irse.py` `Backbone(input_size=112, num_layers=50, drop_ratio=0.6,
mode='ir_se')`, in NHWC:

  input_layer  conv3x3 (no bias) -> BatchNorm -> PReLU(64)
  body         24 bottleneck_IR_SE units (3, 4, 14, 3 at 64, 128, 256, 512 channels); the first
               unit of each stage has stride 2, applied by the unit's SECOND 3x3 conv
  output_layer BatchNorm2d -> Dropout -> Flatten (NCHW order) -> Linear(512*7*7, 512) -> BatchNorm1d
  l2-normalised (no epsilon, as in the original `l2_norm`)

GRAIN always uses this network frozen and in eval mode (`IDLoss().eval()`, never switched to
train), so `train=False` (BatchNorm running statistics, no dropout) is the mode that matters.

The identity loss preprocessing is separate: `identity_crop` (crop + adaptive pooling to 112), and
`layers.resize_bilinear` for the 256 px resize GRAIN's trainer does first; `identity_embedding`
does both and runs the network, as GRAIN's IDLoss (the identity loss and metric use it).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from grain_jax.nets.layers import SqueezeExcite, resize_bilinear
from grain_jax.nets.torch_import import TorchReader

# Units per stage (get_blocks in the original's helpers).
STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
STAGE_DEPTHS = (64, 128, 256, 512)

_BN_EPS = 1e-5
# torch BatchNorm momentum 0.1 (weight of the new batch) = Flax momentum 0.9 (weight of the old).
_BN_MOMENTUM = 0.9


def unit_config(num_layers: int = 50) -> list[tuple[int, int, int]]:
  """(in_channels, depth, stride) of every body unit, in order (body.0, body.1, ...)."""
  units = []
  in_ch = 64
  for n, depth in zip(STAGE_UNITS[num_layers], STAGE_DEPTHS):
    units.append((in_ch, depth, 2))
    units.extend((depth, depth, 1) for _ in range(n - 1))
    in_ch = depth
  return units


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
                      name=name)


class PReLU(nn.Module):
  """Per-channel PReLU (torch nn.PReLU(C)): x if x >= 0 else alpha_c * x."""
  init_value: float = 0.25

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class BottleneckIRSE(nn.Module):
  """bottleneck_IR_SE: BN, conv3x3, PReLU, conv3x3 (stride), BN, SE; plus shortcut."""
  in_channels: int
  depth: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = self.stride
    if self.in_channels == self.depth:
      # MaxPool2d(kernel 1, stride s) is plain strided subsampling.
      shortcut = x[:, ::s, ::s, :]
    else:
      shortcut = nn.Conv(self.depth, (1, 1), strides=(s, s), padding="VALID", use_bias=False,
                         name="shortcut_conv")(x)
      shortcut = _batch_norm(train, "shortcut_bn")(shortcut)
    r = _batch_norm(train, "bn1")(x)
    r = nn.Conv(self.depth, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(r)
    r = PReLU(name="prelu")(r)
    # Explicit symmetric padding: torch's pad-1 stride-2 conv, not Flax's asymmetric "SAME".
    r = nn.Conv(self.depth, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), use_bias=False,
                name="conv2")(r)
    r = _batch_norm(train, "bn2")(r)
    r = SqueezeExcite(name="se")(r)
    return r + shortcut


class InputLayer(nn.Module):
  """conv3x3 3->64 (no bias), BatchNorm, PReLU."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv")(x)
    x = _batch_norm(train, "bn")(x)
    return PReLU(name="prelu")(x)


class OutputLayer(nn.Module):
  """BatchNorm2d, Dropout, Flatten in NCHW order, Linear -> 512, BatchNorm1d."""
  drop_ratio: float = 0.6
  embedding_dim: int = 512

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _batch_norm(train, "bn2d")(x)
    x = nn.Dropout(self.drop_ratio, deterministic=not train)(x)
    # The torch Linear was trained on `view(N, -1)` of an NCHW tensor: flatten in (C, H, W) order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(self.embedding_dim, name="linear")(x)
    return _batch_norm(train, "bn1d")(x)


class IRSE50(nn.Module):
  """ArcFace IR-SE backbone: NHWC images (112x112, [-1, 1]) -> L2-normalised (N, 512) embeddings.

  Submodules are named `input_layer`, `body_<i>` and `output_layer`, so
  `apply(..., capture_intermediates=True)` exposes the same tensors as forward hooks on the
  original's `input_layer`, `body[i]` and `output_layer` (the latter = pre-normalisation output).
  """
  num_layers: int = 50
  drop_ratio: float = 0.6

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = InputLayer(name="input_layer")(x, train)
    for i, (cin, depth, stride) in enumerate(unit_config(self.num_layers)):
      x = BottleneckIRSE(cin, depth, stride, name=f"body_{i}")(x, train)
    x = OutputLayer(self.drop_ratio, name="output_layer")(x, train)
    # l2_norm of the original: x / ||x||, no epsilon.
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def from_torch(reader: TorchReader, model: IRSE50) -> dict:
  """A TreB1eN/pSp IR-SE state dict (e.g. model_ir_se50.pth) -> {"params", "batch_stats"}.

  `num_batches_tracked` buffers are ignored.
  """
  reader.ignore_suffix("num_batches_tracked")
  params: dict = {}
  stats: dict = {}

  def bn(key):
    p = {"scale": reader.get(key + ".weight"), "bias": reader.get(key + ".bias")}
    s = {"mean": reader.get(key + ".running_mean"), "var": reader.get(key + ".running_var")}
    return p, s

  def prelu(key):
    return {"alpha": reader.get(key + ".weight")}

  p_bn, s_bn = bn("input_layer.1")
  params["input_layer"] = {"conv": reader.conv("input_layer.0", bias=False), "bn": p_bn,
                           "prelu": prelu("input_layer.2")}
  stats["input_layer"] = {"bn": s_bn}

  for i, (cin, depth, _) in enumerate(unit_config(model.num_layers)):
    k = f"body.{i}."
    p_bn1, s_bn1 = bn(k + "res_layer.0")
    p_bn2, s_bn2 = bn(k + "res_layer.4")
    p = {
        "bn1": p_bn1,
        "conv1": reader.conv(k + "res_layer.1", bias=False),
        "prelu": prelu(k + "res_layer.2"),
        "conv2": reader.conv(k + "res_layer.3", bias=False),
        "bn2": p_bn2,
        "se": {"fc1": reader.conv(k + "res_layer.5.fc1", bias=False),
               "fc2": reader.conv(k + "res_layer.5.fc2", bias=False)},
    }
    s = {"bn1": s_bn1, "bn2": s_bn2}
    if cin != depth:
      p["shortcut_conv"] = reader.conv(k + "shortcut_layer.0", bias=False)
      p["shortcut_bn"], s["shortcut_bn"] = bn(k + "shortcut_layer.1")
    params[f"body_{i}"] = p
    stats[f"body_{i}"] = s

  p_bn2d, s_bn2d = bn("output_layer.0")
  p_bn1d, s_bn1d = bn("output_layer.4")
  params["output_layer"] = {"bn2d": p_bn2d, "linear": reader.dense("output_layer.3"),
                            "bn1d": p_bn1d}
  stats["output_layer"] = {"bn2d": s_bn2d, "bn1d": s_bn1d}

  return {"params": params, "batch_stats": stats}


# --- IDLoss preprocessing ----------------------------------------------------------------------
#
# GRAIN's trainer (coaches/coachTrain.py, calc_loss) first resizes both images to 256x256 with
# F.interpolate(mode="bilinear") (align_corners=False, no antialiasing), and calls
# id_loss(hr_256, y_256, y_256). IDLoss.extract_feats (criteria/id_loss.py) then crops
# x[:, :, 35:223, 32:220] (188x188) and applies AdaptiveAvgPool2d((112, 112)) ("face_pool")
# before the backbone. IDLoss itself does no resizing: the 256 assumption lives in the crop.

ID_CROP_ROWS = (35, 223)
ID_CROP_COLS = (32, 220)
ID_INPUT_SIZE = 256
ID_NET_SIZE = 112


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's AdaptiveAvgPool along one axis.

  Output i averages inputs [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)); for 188 -> 112 these
  windows have 2 or 3 taps and overlap, so it is not a plain strided pooling.
  """
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: Sequence[int] | int) -> jax.Array:
  """torch AdaptiveAvgPool2d on NHWC `x` to `size` = (H, W) (or an int for both)."""
  oh, ow = (size, size) if isinstance(size, int) else size
  ph = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], oh), x.dtype)
  pw = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], ow), x.dtype)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", ph, x, precision=hp)
  return jnp.einsum("pw,nowc->nopc", pw, x, precision=hp)


def identity_crop(x: jax.Array) -> jax.Array:
  """GRAIN IDLoss preprocessing: NHWC 256x256 images -> 112x112 face crops for `IRSE50`.

  Crops rows 35..222 and columns 32..219 (188x188) and adaptive-average-pools to 112x112. Images
  of another size must first be brought to 256 as GRAIN's trainer does, i.e.
  `layers.resize_bilinear(x, 256)`.
  """
  if x.shape[1:3] != (ID_INPUT_SIZE, ID_INPUT_SIZE):
    raise ValueError(f"identity_crop expects {ID_INPUT_SIZE}x{ID_INPUT_SIZE} NHWC images (the "
                     f"crop box is fixed for that size), got shape {x.shape}; "
                     f"use grain_jax.nets.layers.resize_bilinear(x, {ID_INPUT_SIZE}) first")
  x = x[:, ID_CROP_ROWS[0]:ID_CROP_ROWS[1], ID_CROP_COLS[0]:ID_CROP_COLS[1], :]
  return adaptive_avg_pool(x, ID_NET_SIZE)


def identity_embedding(variables, x: jax.Array) -> jax.Array:
  """The IR-SE50 embedding (N, 512) of NHWC images in [-1, 1] of any size, as GRAIN's IDLoss
  computes it: bilinear to 256, crop, pool to 112, network."""
  return IRSE50().apply(variables, identity_crop(resize_bilinear(x, ID_INPUT_SIZE)))
