"""The InceptionV3 of FID, as pytorch-fid computes it (its `InceptionV3` with
`use_fid_inception=True`, weights `pt_inception-2015-12-05-*.pth`).

pytorch-fid ports TensorFlow's FID network onto torchvision's InceptionV3 and patches its
blocks to match: average pools that ignore the zero padding (Mixed_5*, 6*, 7b) and a max
pool in the last block's pool branch (Mixed_7c). Inputs are RGB in [0, 1], resized to
299x299 bilinearly (torch's F.interpolate, no antialiasing) and scaled to [-1, 1]. The
features are the spatial mean of the chosen block: 64 (after the first max pool), 192
(second max pool), 768 (Mixed_6e) or 2048 (Mixed_7c, the standard FID) dimensions.
Module and parameter names follow the PyTorch ones, so `from_torch` is a renaming.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from grain_jax.nets.layers import resize_bilinear

DIMS = (64, 192, 768, 2048)  # pytorch-fid's --dims: the output of each of its 4 blocks
# pytorch-fid's weights (its FID_WEIGHTS_URL); nothing is downloaded at run time.
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, as torchvision's."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  # F.avg_pool2d(k=3, s=1, p=1, count_include_pad=False): the TensorFlow average
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool) and Mixed_7c (max pool: pytorch-fid's FIDInceptionE_2)."""
  max_pool_branch: bool = False

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                          BasicConv2d(384, **col, name="branch3x3_2b")(b3)], -1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max_pool(x, 1, 1) if self.max_pool_branch else _avg_pool_same(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """images (N, H, W, 3) RGB in [0, 1] -> FID features (N, dims), float32."""
  dims: int = 2048

  @nn.compact
  def __call__(self, x):
    if self.dims not in DIMS:
      raise ValueError(f"dims must be one of {DIMS}, got {self.dims}")
    x = resize_bilinear(x.astype(jnp.float32), 299) * 2.0 - 1.0
    features = lambda h: jnp.mean(h, axis=(1, 2))  # pytorch-fid's adaptive_avg_pool2d to 1x1
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    if self.dims == 64:
      return features(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    if self.dims == 192:
      return features(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    if self.dims == 768:
      return features(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    return features(x)


def expected_variables(dims: int = 2048) -> dict:
  """The variables tree (shapes only) of the network up to the block of `dims`."""
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3(dims).init, jax.random.key(0), x)


def from_torch(reader) -> dict:
  """pytorch-fid's weights (pt_inception-2015-12-05-*.pth: torchvision InceptionV3 names) ->
  {"params", "batch_stats"} of FIDInceptionV3 (all 2048-d blocks; a smaller `dims` uses a
  prefix of them). The classifier (`fc.*`) and `num_batches_tracked` are not used."""
  reader.ignore_suffix("num_batches_tracked")
  reader.ignore_prefix("fc.")
  reader.ignore_prefix("AuxLogits.")
  params, stats = {}, {}
  flat = traverse_util.flatten_dict(expected_variables(2048)["params"])
  for path in sorted({p[:-2] for p in flat if p[-2:] == ("conv", "kernel")}):
    key = ".".join(path)
    params[path + ("conv",)] = reader.conv(key + ".conv", bias=False)
    params[path + ("bn",)] = {"scale": reader.get(key + ".bn.weight"),
                              "bias": reader.get(key + ".bn.bias")}
    stats[path + ("bn",)] = {"mean": reader.get(key + ".bn.running_mean"),
                             "var": reader.get(key + ".bn.running_var")}
  return {"params": traverse_util.unflatten_dict(params),
          "batch_stats": traverse_util.unflatten_dict(stats)}
