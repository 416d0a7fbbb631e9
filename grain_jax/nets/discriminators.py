"""The two discriminators of GRAIN training, and their PyTorch checkpoint converters.

* `StyleGAN2Discriminator`: rosinality's StyleGAN2 `Discriminator` (stages 2-4 start from its
  pretrained weights, the `{"d": ...}` part of a rosinality checkpoint).
* `PatchDiscriminator`: the SRGAN-style patch discriminator of stage 1 (GRAIN
  `models/invRRDB.py: Discriminator`), trained from scratch on 256x256 bilinear resizes.

Both are NHWC. The patch discriminator resizes its input with `layers.resize_bilinear`
(torch's `F.interpolate(mode="bilinear")`, as the original's trainer does).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.nets.layers import (TORCH_KERNEL_INIT, ConvFn, EqualConv2d, EqualLinear,
                                   FusedLeakyReLU, blur, check_fir_buffer, clamp,
                                   resize_bilinear)
from grain_jax.nets.torch_import import TorchReader


# ----------------------------------------------------------------------------------------------
# StyleGAN2 discriminator (rosinality stylegan2-pytorch, model.py: ConvLayer, ResBlock,
# Discriminator).


def _log2(size: int) -> int:
  log = int(round(math.log2(size)))
  if size < 4 or 2 ** log != size:
    raise ValueError(f"size must be a power of two >= 4, got {size}")
  return log


def _check_channels(size: int, channels: Sequence[int]) -> None:
  want = _log2(size) - 1
  if len(channels) != want:
    raise ValueError(f"channels must give one width per resolution 4..{size} ({want} values), "
                     f"got {len(channels)}: {tuple(channels)}")


class ConvLayer(nn.Module):
  """rosinality's ConvLayer: [blur] -> EqualConv2d -> [FusedLeakyReLU].

  With `downsample`, the input is blurred with padding ((p+1)//2, p//2),
  p = len(blur_kernel) - 2 + kernel_size - 1, and the conv has stride 2 and no padding;
  otherwise the conv pads kernel_size//2. With `activate` the bias lives in the activation
  (torch `<name>.<i>.bias` of FusedLeakyReLU); without it, in the conv (if `use_bias`).
  Submodules: `conv` (torch index 0, or 1 after a blur) and `act` (the index after the conv).
  """
  features: int
  kernel_size: int
  downsample: bool = False
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  use_bias: bool = True
  activate: bool = True
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD
  conv_clamp: float = 0.0        # StyleGAN2-ADA's: output clipped to +-conv_clamp (0: none)

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    if self.downsample:
      p = len(self.blur_kernel) - 2 + (k - 1)
      x = blur(x, self.blur_kernel, ((p + 1) // 2, p // 2))
      stride, padding = 2, 0
    else:
      stride, padding = 1, k // 2
    x = EqualConv2d(self.features, k, stride=stride, padding=padding,
                    use_bias=self.use_bias and not self.activate,
                    weight_grad=self.conv_weight_grad, name="conv")(x)
    if self.activate:
      if not self.use_bias:
        # rosinality's ConvLayer(bias=False, activate=True) is never used by the discriminator.
        raise NotImplementedError("ConvLayer without bias but with activation")
      x = FusedLeakyReLU(name="act")(x)
    return clamp(x, self.conv_clamp)


class ResBlock(nn.Module):
  """rosinality's ResBlock: (conv2(conv1(x)) + skip(x)) / sqrt(2), halving the resolution.
  With conv_clamp the outputs of conv1 and conv2 are clipped before the sum (ADA clips conv2's,
  scaled by 1/sqrt(2), at conv_clamp/sqrt(2): the same), not the skip's (as ADA)."""
  features: int
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  conv_weight_grad: str = "xla"
  conv_clamp: float = 0.0

  @nn.compact
  def __call__(self, x):
    wg, cc = self.conv_weight_grad, self.conv_clamp
    out = ConvLayer(x.shape[-1], 3, conv_weight_grad=wg, conv_clamp=cc, name="conv1")(x)
    out = ConvLayer(self.features, 3, downsample=True, blur_kernel=self.blur_kernel,
                    conv_weight_grad=wg, conv_clamp=cc, name="conv2")(out)
    skip = ConvLayer(self.features, 1, downsample=True, blur_kernel=self.blur_kernel,
                     use_bias=False, activate=False, conv_weight_grad=wg, name="skip")(x)
    return (out + skip) * (1 / math.sqrt(2))


def minibatch_stddev(x: jax.Array, group_size: int = 4, num_features: int = 1) -> jax.Array:
  """Appends StyleGAN2's minibatch-stddev channel(s) as the LAST channel(s), NHWC.

  As the original: group = min(N, group_size), and the torch `view(group, -1, ...)` makes
  sample n = g * (N // group) + m share its statistics with the samples of the same m, i.e.
  the same n % (N // group). Per group: population variance over the group + 1e-8, sqrt,
  mean over (channels of the feature, H, W). A batch that the group does not divide is an
  error, as in torch.
  """
  n, h, w, c = x.shape
  group = min(n, group_size)
  if n % group:
    raise ValueError(f"minibatch stddev: batch size {n} is not divisible by the stddev group "
                     f"size min(batch, {group_size}) = {group}; use a batch that is a multiple "
                     f"of {group_size} (or smaller than it)")
  if c % num_features:
    raise ValueError(f"minibatch stddev: {c} channels do not split into {num_features} features")
  m = n // group
  y = x.reshape(group, m, h, w, num_features, c // num_features)
  y = y - jnp.mean(y, axis=0, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(y), axis=0) + 1e-8)        # (m, h, w, F, C/F)
  std = jnp.mean(std, axis=(1, 2, 4))                            # (m, F)
  std = jnp.tile(std, (group, 1))                                # sample n -> std[n % m]
  std = jnp.broadcast_to(std[:, None, None, :], (n, h, w, num_features)).astype(x.dtype)
  return jnp.concatenate([x, std], axis=-1)


class StyleGAN2Discriminator(nn.Module):
  """rosinality's StyleGAN2 Discriminator, NHWC: (N, size, size, 3) in [-1, 1] -> (N, 1) logits.

  `channels` gives the width at each resolution 4, 8, ..., size (`stylegan2.default_channels`).
  Layout and torch keys (K = 1..log2(size)-2, resolution size / 2^K after block K):
    convs_0      ConvLayer(3 -> ch[size], 1x1)     convs.0.0.weight, convs.0.1.bias
    convs_K      ResBlock                          convs.K.conv1.{0.weight,1.bias},
                                                   convs.K.conv2.{0.kernel (blur), 1.weight, 2.bias},
                                                   convs.K.skip.{0.kernel (blur), 1.weight}
    (minibatch stddev appended as the last channel)
    final_conv   ConvLayer(ch4 + F -> ch4, 3x3)   final_conv.0.weight, final_conv.1.bias
    final_linear_0  EqualLinear(16 ch4 -> ch4, fused lrelu)   final_linear.0.{weight,bias}
    final_linear_1  EqualLinear(ch4 -> 1)                      final_linear.1.{weight,bias}
  Flax paths: convs_K/conv1/conv/kernel, convs_K/conv1/act/bias, convs_K/skip/conv/kernel, ...
  The flatten before final_linear_0 is in NCHW order, as the original's `view(N, -1)`, so the
  torch weight is used as it is (transposed only).

  The stddev channel couples the samples of a batch (see `minibatch_stddev`): logits depend on
  the batch composition and order. `return_intermediates=True` also returns the outputs of
  convs0, resblock1.., final_conv (NHWC) and final_linear0 (names of the reference data).
  (The original's final_conv takes in_channel + 1 whatever stddev_feat; here it takes + F, the
  same for the default F = 1.)
  """
  size: int
  channels: Sequence[int]
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  stddev_group: int = 4
  stddev_feat: int = 1
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD
  conv_clamp: float = 0.0  # StyleGAN2-ADA's, on every conv (nets/ada_pickle.py); 0: none

  def setup(self):
    _check_channels(self.size, self.channels)
    ch = {4 * 2 ** i: c for i, c in enumerate(self.channels)}
    wg, cc = self.conv_weight_grad, float(self.conv_clamp)
    # Lists named convs / final_linear give the submodules the paths convs_K, final_linear_K.
    self.convs = [ConvLayer(ch[self.size], 1, conv_weight_grad=wg, conv_clamp=cc)] + [
        ResBlock(ch[2 ** (i - 1)], self.blur_kernel, wg, cc)
        for i in range(_log2(self.size), 2, -1)]
    self.final_conv = ConvLayer(ch[4], 3, conv_weight_grad=wg, conv_clamp=cc)
    self.final_linear = [EqualLinear(ch[4], activation=True), EqualLinear(1)]

  def __call__(self, x, return_intermediates: bool = False):
    """Logits (N, 1); with `return_intermediates`, (logits, {name: NHWC / (N, C) array})."""
    inter = {}
    out = self.trunk(x, inter)
    logits = self.head(out, inter)
    return (logits, inter) if return_intermediates else logits

  def trunk(self, x, inter: dict | None = None):
    """The convolutions from the image down to 4x4 (N, 4, 4, ch4): each sample on its own."""
    if x.shape[1:] != (self.size, self.size, 3):
      raise ValueError(f"expected (N, {self.size}, {self.size}, 3) images, got {x.shape}")
    inter = {} if inter is None else inter
    for k, block in enumerate(self.convs):
      x = inter["convs0" if k == 0 else f"resblock{k}"] = block(x)
    return x

  def head(self, out, inter: dict | None = None):
    """The trunk's 4x4 output -> logits (N, 1): minibatch stddev (which couples the samples),
    final_conv and the two linear layers."""
    inter = {} if inter is None else inter
    out = minibatch_stddev(out, self.stddev_group, self.stddev_feat)
    out = inter["final_conv"] = self.final_conv(out)
    # NCHW flatten, to use the original's final_linear.0 weight unpermuted.
    out = jnp.transpose(out, (0, 3, 1, 2)).reshape(out.shape[0], -1)
    out = inter["final_linear0"] = self.final_linear[0](out)
    return self.final_linear[1](out)


def discriminator_from_torch(rd: TorchReader, model: StyleGAN2Discriminator) -> dict:
  """A rosinality Discriminator state dict (checkpoint["d"]) -> {"params": ...}.

  The blur buffers (`*.conv2.0.kernel`, `*.skip.0.kernel`) are not parameters; they must equal
  make_kernel(blur_kernel), else the file was made for another configuration.
  """
  def conv_layer(key, conv_index, bias_in_act=True):
    p = {"conv": {"kernel": rd.conv(f"{key}.{conv_index}", bias=False)["kernel"]}}
    if bias_in_act:
      p["act"] = {"bias": rd.get(f"{key}.{conv_index + 1}.bias")}
    return p

  params = {"convs_0": conv_layer("convs.0", 0)}
  for k in range(1, _log2(model.size) - 1):
    key = f"convs.{k}"
    for fir in (f"{key}.conv2.0.kernel", f"{key}.skip.0.kernel"):
      rd.problem(*check_fir_buffer(rd.get(fir), model.blur_kernel, 1.0, fir))
    params[f"convs_{k}"] = {
        "conv1": conv_layer(f"{key}.conv1", 0),
        "conv2": conv_layer(f"{key}.conv2", 1),
        "skip": conv_layer(f"{key}.skip", 1, bias_in_act=False),
    }
  params["final_conv"] = conv_layer("final_conv", 0)
  params["final_linear_0"] = rd.dense("final_linear.0")
  params["final_linear_1"] = rd.dense("final_linear.1")
  return {"params": params}


# ----------------------------------------------------------------------------------------------
# Stage-1 patch discriminator (GRAIN models/invRRDB.py: Discriminator).


def _torch_uniform_bias(fan_in: int):
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchConv3x3(nn.Module):
  """3x3 conv with bias, explicit zero padding 1, and torch's default initialisation.

  Padding is explicit ((1, 1), (1, 1)): Flax 'SAME' at stride 2 on an even size would pad
  (0, 1) and shift the sampling grid by one pixel relative to torch.
  """
  features: int
  stride: int = 1
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1] * 9
    wg = self.conv_weight_grad
    # torch's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for weight and bias.
    return nn.Conv(self.features, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
                   kernel_init=TORCH_KERNEL_INIT,
                   bias_init=_torch_uniform_bias(fan_in), name="conv",
                   conv_general_dilated_cls=None if wg == "xla" else ConvFn(wg))(x)


class BatchNorm2d(nn.Module):
  """torch.nn.BatchNorm2d (affine, eps 1e-5, torch momentum 0.1), NHWC.

  `momentum` uses the Flax convention (0.9 = torch 0.1): running = m * running + (1-m) * batch.
  As torch, the running variance is updated with the UNBIASED batch variance (Flax's BatchNorm
  uses the biased one), while normalisation in training uses the biased one.
  Params 'scale', 'bias'; batch_stats 'mean', 'var' (torch weight, bias, running_mean, running_var).
  With `axis_name`, batch statistics are over the whole batch across that mapped axis
  (synchronised BatchNorm, for data parallelism with equal shards).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      n = x.size // c
      if self.axis_name:
        mean = jax.lax.pmean(mean, self.axis_name)
        n = n * jax.lax.psum(1, self.axis_name)
      var = jnp.mean(jnp.square(x - mean), axes)
      if self.axis_name:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * (n / jnp.maximum(n - 1, 1))
        ra_var.value = m * ra_var.value + (1 - m) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean.astype(x.dtype)) * jax.lax.rsqrt(var.astype(x.dtype) + self.epsilon)
    return y * scale.astype(x.dtype) + bias.astype(x.dtype)


class PatchDiscriminator(nn.Module):
  """GRAIN's stage-1 (invRRDB) discriminator: SRGAN-style, NHWC, (N, H, W, 3) -> (N, h, w, 1).

  Original: `models/invRRDB.py: Discriminator` (an nn.Sequential `model`), fed by
  `coaches/coachTrain.py` with `F.interpolate(img, size=[256, 256], mode="bilinear")`
  (align_corners=False, no antialias), separately for the real and the fake batch.
  Here that resize is `input_size` (None: use the input as it is). Layers: for each width
  w_i in `widths` (64, 128, 256, 512): 3x3 conv stride 1 pad 1 (bias) -> BatchNorm (not in the
  very first block) -> LeakyReLU(0.2) -> 3x3 conv stride 2 pad 1 (bias) -> BatchNorm ->
  LeakyReLU(0.2); then a 3x3 conv stride 1 pad 1 (bias) -> 1 channel, no activation. All
  convs have biases, zero padding, torch default init; BatchNorm affine, eps 1e-5, momentum
  0.1 (torch). 256 in -> 16x16 logits (one stride 2 per block).

  `train=True` normalises with batch statistics and updates 'batch_stats' (apply with
  mutable=['batch_stats']); the original never puts this discriminator in eval mode, so it
  always uses batch statistics, and each of its calls (real, fake) has its own.
  Submodules: block{i}_conv1, block{i}_bn1 (i > 0), block{i}_conv2, block{i}_bn2, out_conv.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  input_size: int | None = 256
  bn_momentum: float = 0.9
  axis_name: str | None = None  # synchronised BatchNorm over this mapped axis
  conv_weight_grad: str = "xla"  # layers.CONV_WEIGHT_GRAD

  @nn.compact
  def __call__(self, x, train: bool):
    wg = self.conv_weight_grad
    if self.input_size is not None:
      x = resize_bilinear(x, self.input_size)
    for i, w in enumerate(self.widths):
      x = TorchConv3x3(w, conv_weight_grad=wg, name=f"block{i}_conv1")(x)
      if i > 0:
        x = BatchNorm2d(self.bn_momentum, axis_name=self.axis_name, name=f"block{i}_bn1")(x, train)
      x = nn.leaky_relu(x, 0.2)
      x = TorchConv3x3(w, stride=2, conv_weight_grad=wg, name=f"block{i}_conv2")(x)
      x = BatchNorm2d(self.bn_momentum, axis_name=self.axis_name, name=f"block{i}_bn2")(x, train)
      x = nn.leaky_relu(x, 0.2)
    return TorchConv3x3(1, conv_weight_grad=wg, name="out_conv")(x)


def patch_discriminator_torch_indices(n_blocks: int) -> dict[str, int]:
  """Flax submodule name -> index in the original's nn.Sequential `model`.

  The first block has 5 layers (conv, lrelu, conv, bn, lrelu), the others 6
  (conv, bn, lrelu, conv, bn, lrelu); the output conv comes last.
  """
  idx = {"block0_conv1": 0, "block0_conv2": 2, "block0_bn2": 3}
  for i in range(1, n_blocks):
    base = 5 + 6 * (i - 1)
    idx.update({f"block{i}_conv1": base, f"block{i}_bn1": base + 1,
                f"block{i}_conv2": base + 3, f"block{i}_bn2": base + 4})
  idx["out_conv"] = 5 + 6 * (n_blocks - 1)
  return idx


def patch_discriminator_from_torch(rd: TorchReader, model: PatchDiscriminator) -> dict:
  """GRAIN's patch discriminator state dict -> {"params": ..., "batch_stats": ...}.

  Accepts both key forms: `model.N.*` (what GRAIN's trainer saves, `dis.state_dict()` under
  "state_dict" of `*_dis.pt`) and `N.*` (what GRAIN's own loader feeds to `dis.model`, so it
  cannot actually reload the files it saves). `num_batches_tracked` is ignored.
  """
  pre = "model." if any(k.startswith("model.") for k in rd.sd) else ""
  rd.ignore_suffix(".num_batches_tracked")
  params, stats = {}, {}
  for name, i in patch_discriminator_torch_indices(len(model.widths)).items():
    key = f"{pre}{i}"
    if "_bn" in name:
      params[name] = {"scale": rd.get(f"{key}.weight"), "bias": rd.get(f"{key}.bias")}
      stats[name] = {"mean": rd.get(f"{key}.running_mean"), "var": rd.get(f"{key}.running_var")}
    else:
      params[name] = {"conv": rd.conv(key)}
  return {"params": params, "batch_stats": stats}
