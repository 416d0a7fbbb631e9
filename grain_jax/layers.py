"""Building blocks shared by the networks, each as its PyTorch original computes it.

* GRAIN's plain convolutions: `conv3x3` (torch's Conv2d padding and initialisation), `lrelu`,
  nearest upsampling;
* StyleGAN2's FIR resampling (`upfirdn2d`), the fused leaky ReLU, and the equalized-learning-
  rate layers. Equalized layers store their weights as PyTorch does (N(0,1)-scaled) and
  multiply by 1/sqrt(fan_in) at run time, so converted weights are used as they are and an
  optimizer sees the same parameterisation as in the original;
* squeeze-excitation (Fusion, IR-SE50) and torch's bilinear resize (the losses).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


def lrelu(x):
  """LeakyReLU(0.2), GRAIN's activation."""
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
  """Nearest-neighbour upsampling by an integer factor (F.interpolate(mode='nearest'))."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
  return x.reshape(n, h * factor, w * factor, c)


def make_kernel(k: Sequence[float]) -> np.ndarray:
  """rosinality's make_kernel: outer product of a 1-D kernel, normalised to sum 1."""
  k = np.asarray(k, np.float32)
  if k.ndim == 1:
    k = k[None, :] * k[:, None]
  return k / k.sum()


def _fir_1d(x: jax.Array, taps: np.ndarray, axis: int, down: int) -> jax.Array:
  """1-D correlation along H (axis 1) or W (axis 2), VALID, stride `down`, as shifted adds.

  XLA:CPU runs depthwise (feature-grouped) convolutions some 20x slower than these
  elementwise adds of shifted slices (7.7 s vs 0.34 s on a (4, 128, 128, 256) map).
  """
  n = (x.shape[axis] - len(taps)) // down + 1
  out = None
  for k, t in enumerate(taps):
    part = jax.lax.slice_in_dim(x, k, k + (n - 1) * down + 1, stride=down, axis=axis)
    part = part * jnp.asarray(t, x.dtype)
    out = part if out is None else out + part
  return out


def _fir_2d(x: jax.Array, kernel: np.ndarray, down: int) -> jax.Array:
  c = x.shape[-1]
  kh, kw = kernel.shape
  w = jnp.broadcast_to(jnp.asarray(kernel, x.dtype)[:, :, None, None], (kh, kw, 1, c))
  return jax.lax.conv_general_dilated(x, w, (down, down), "VALID", dimension_numbers=_DN,
                                      feature_group_count=c)


def _pad_or_crop(x: jax.Array, axis: int, p0: int, p1: int) -> jax.Array:
  if p0 < 0:
    x = jax.lax.slice_in_dim(x, -p0, x.shape[axis], axis=axis)
    p0 = 0
  if p1 < 0:
    x = jax.lax.slice_in_dim(x, 0, x.shape[axis] + p1, axis=axis)
    p1 = 0
  if p0 or p1:
    pads = [(0, 0)] * x.ndim
    pads[axis] = (p0, p1)
    x = jnp.pad(x, pads)
  return x


def _upsample_zeros(x: jax.Array, axis: int, up: int) -> jax.Array:
  """Inserts up-1 zeros after every sample along `axis` (length n -> n*up)."""
  if up == 1:
    return x
  x = jnp.expand_dims(x, axis + 1)
  pads = [(0, 0)] * x.ndim
  pads[axis + 1] = (0, up - 1)
  x = jnp.pad(x, pads)
  shape = list(x.shape)
  shape[axis:axis + 2] = [shape[axis] * up]
  return x.reshape(shape)


def upfirdn2d(x: jax.Array, kernel, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> jax.Array:
  """Upsample (zero insertion), pad, FIR filter, downsample: rosinality's upfirdn2d, NHWC.

  The filter is a true convolution (kernel flipped) as in the original. `kernel` is either
  1-D (separable: the 2-D filter is its outer product, two cheap 1-D passes) or 2-D.
  `pad` = (before, after) for both spatial axes; negative values crop.
  """
  kernel = np.asarray(kernel, np.float32)
  for axis in (1, 2):
    x = _upsample_zeros(x, axis, up)
    x = _pad_or_crop(x, axis, *pad)
  if kernel.ndim == 1:
    taps = kernel[::-1]
    x = _fir_1d(x, taps, 1, down)
    return _fir_1d(x, taps, 2, down)
  return _fir_2d(x, kernel[::-1, ::-1], down)


def separable_taps(blur_kernel: Sequence[float], gain: float = 1.0) -> np.ndarray:
  """1-D taps whose outer product is make_kernel(blur_kernel) * gain."""
  k = np.asarray(blur_kernel, np.float32)
  return k / k.sum() * np.float32(math.sqrt(gain))


def fused_leaky_relu(x: jax.Array, bias: jax.Array | None = None,
                     negative_slope: float = 0.2, gain: float = math.sqrt(2)) -> jax.Array:
  """leaky_relu(x + bias, 0.2) * sqrt(2) (rosinality's FusedLeakyReLU; slope is always 0.2)."""
  if bias is not None:
    x = x + bias.astype(x.dtype)
  return jax.nn.leaky_relu(x, negative_slope) * jnp.asarray(gain, x.dtype)


class FusedLeakyReLU(nn.Module):
  """FusedLeakyReLU with its own learned bias (torch key `<name>.bias`)."""

  @nn.compact
  def __call__(self, x):
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return fused_leaky_relu(x, bias)


class EqualConv2d(nn.Module):
  """Conv with equalized learning rate: weight * 1/sqrt(in * k * k) at run time."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    k = self.kernel_size
    w = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features), jnp.float32)
    scale = 1.0 / math.sqrt(cin * k * k)
    y = jax.lax.conv_general_dilated(
        x, (w * scale).astype(x.dtype), (self.stride, self.stride),
        [(self.padding, self.padding)] * 2, dimension_numbers=_DN)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(y.dtype)
    return y


class EqualLinear(nn.Module):
  """Linear with equalized learning rate and optional fused leaky ReLU (StyleGAN2)."""
  features: int
  use_bias: bool = True
  bias_init: float = 0.0
  lr_mul: float = 1.0
  activation: bool = False

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    # Stored as randn / lr_mul, like the original, so lr_mul scales the effective step size.
    w = self.param("kernel", lambda k, s: jax.random.normal(k, s) / self.lr_mul,
                   (cin, self.features))
    scale = self.lr_mul / math.sqrt(cin)
    y = x @ (w * scale).astype(x.dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,)) * self.lr_mul
    if self.activation:
      return fused_leaky_relu(y, bias)
    return y if bias is None else y + bias.astype(y.dtype)


class SqueezeExcite(nn.Module):
  """Global average pool, 1x1 conv C -> C/r (no bias), ReLU, 1x1 conv back, sigmoid, scale.

  The SE block of both GRAIN's Fusion and the IR-SE50 units (torch keys fc1, fc2).
  """
  reduction: int = 16

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = jax.nn.relu(nn.Conv(max(c // self.reduction, 1), (1, 1), use_bias=False, name="fc1")(s))
    s = jax.nn.sigmoid(nn.Conv(c, (1, 1), use_bias=False, name="fc2")(s))
    return x * s


def blur(x: jax.Array, blur_kernel: Sequence[float], pad: tuple[int, int],
         gain: float = 1.0) -> jax.Array:
  """rosinality's Blur: upfirdn2d with make_kernel(blur_kernel) * gain and padding `pad`."""
  return upfirdn2d(x, separable_taps(blur_kernel, gain), pad=pad)


def check_fir_buffer(value, blur_kernel: Sequence[float], gain: float, key: str) -> list[str]:
  """Problems (as messages) if a checkpoint's FIR buffer differs from the configured kernel."""
  want = make_kernel(blur_kernel) * gain
  if value is None:
    return []
  if np.shape(value) != want.shape or not np.allclose(value, want, rtol=1e-6, atol=1e-7):
    return [f"{key}: FIR kernel differs from the configured blur_kernel {list(blur_kernel)}"]
  return []


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of F.interpolate(mode='bilinear', align_corners=False).

  Computed in float32 like torch's CPU kernel: at non-integer scales the float32 rounding of
  the source coordinate moves the weights by up to ~1e-6, visible in the outputs.
  """
  f32 = np.float32
  scale = f32(n_in) / f32(n_out)
  src = scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
  src = np.maximum(src, f32(0))  # torch clamps negative source coordinates to the first pixel
  i0 = np.minimum(src.astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
  return i0, i1, f32(1) - w1, w1


def resize_bilinear(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """NHWC resize equal to torch `F.interpolate(x, size, mode="bilinear")` (align_corners=False).

  Two taps per axis and no antialiasing, also when shrinking (a 1024 -> 256 resize averages
  2 of every 4 pixels, 1024 -> 16 just 2 of every 64), exactly as the original's losses and
  discriminator input. Interpolates along W, then H, like torch's kernel.
  """
  oh, ow = (size, size) if isinstance(size, int) else size
  for axis, n_out in ((2, ow), (1, oh)):
    n_in = x.shape[axis]
    if n_in == n_out:
      continue  # torch copies in this case
    i0, i1, w0, w1 = _bilinear_taps(n_in, n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    x = jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1
  return x
