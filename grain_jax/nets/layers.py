"""Building blocks shared by the networks, each as its PyTorch original computes it.

* GRAIN's plain convolutions: `conv3x3` (torch's Conv2d padding and initialisation), `lrelu`,
  nearest upsampling;
* StyleGAN2's FIR resampling (`upfirdn2d`), the fused leaky ReLU, and the equalized-learning-
  rate layers. Equalized layers store their weights as PyTorch does (N(0,1)-scaled) and
  multiply by 1/sqrt(fan_in) at run time, so converted weights are used as they are and an
  optimizer sees the same parameterisation as in the original;
* squeeze-excitation (Fusion, IR-SE50) and torch's bilinear resize (the losses);
* `conv2d`: the NHWC convolution of the trained networks, whose weight gradient can be
  computed as chunked im2col matmuls instead of XLA's formulation (`conv_weight_grad`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


@jax.custom_vjp
def lrelu(x):
  """LeakyReLU(0.2), GRAIN's activation.

  Its gradient is jax.nn.leaky_relu's, taken from the output (y >= 0 exactly where x >= 0):
  the backward pass then keeps only y, which the next convolution keeps anyway, instead of a
  mask of its own (1.1 GiB of stage 4's plan at 1024 and 2 per v5e chip).
  """
  return jax.nn.leaky_relu(x, 0.2)


def _lrelu_fwd(x):
  y = jax.nn.leaky_relu(x, 0.2)
  return y, y


def _lrelu_bwd(y, g):
  return (jnp.where(y >= 0, g, 0.2 * g),)


lrelu.defvjp(_lrelu_fwd, _lrelu_bwd)


# PyTorch's default Conv2d / Linear weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)),
# a third of Flax's default variance. GRAIN trains from it; with Flax's larger default the
# stacked dense blocks start with much larger activations and train more slowly.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


# ------------------------------------------------------------------------------ convolutions

# How a convolution's weight gradient is computed (model config `conv_weight_grad`):
#   'xla':    as XLA differentiates lax.conv_general_dilated;
#   'matmul': im2col in row chunks, one matmul per chunk (`conv_weight_grad_matmul`);
#   'auto':   on a CPU, 'matmul' for convolutions with large activations (below) and 'xla'
#             for the others; 'xla' on GPU/TPU. Decided per convolution when traced, from
#             jax.default_backend() and the shapes.
# XLA:CPU computes a weight gradient as a convolution with an image-sized window over
# transposed copies of the activations, several times slower than these matmuls once the
# activations outgrow the caches; on small maps it is about as fast, and there the matmul
# form only adds compilation time (docs/performance.md has the measurements). GPUs and TPUs
# have weight-gradient kernels of their own. The forward pass and the input gradient are
# XLA's in every mode.
CONV_WEIGHT_GRAD = ("xla", "matmul", "auto")
# 'auto' takes the matmul form from this many input elements, N * H * W * max(Cin, Cout).
AUTO_MATMUL_MIN_ELEMENTS = 2 ** 20
# im2col bytes per chunk: a chunk stays in the L2 cache and needs no fresh pages (a
# whole-image im2col is slower); 0.5-8 MB time alike on the Xeon measured (2 MB L2 a core).
WEIGHT_GRAD_CHUNK_BYTES = 2 ** 21


def conv_weight_grad_impl(mode: str, x_shape: Sequence[int] | None = None,
                          kernel_shape: Sequence[int] | None = None) -> str:
  """'xla' or 'matmul': what `mode` (a CONV_WEIGHT_GRAD value) means on this backend for a
  convolution of these shapes (NHWC input, HWIO kernel; without shapes 'auto' on a CPU
  means 'matmul')."""
  if _checked(mode) != "auto":
    return mode
  if jax.default_backend() != "cpu":
    return "xla"
  if x_shape is None or kernel_shape is None:
    return "matmul"
  n, h, w, cin = x_shape
  big = n * h * w * max(cin, kernel_shape[-1]) >= AUTO_MATMUL_MIN_ELEMENTS
  return "matmul" if big else "xla"


def for_platform(model_cfg, platform: str):
  """`model_cfg` for programs compiled for `platform` ('cpu', 'gpu', 'tpu'): off a CPU an
  'auto' conv_weight_grad is 'xla' (a copy that says so), whatever the host's own backend,
  so that a TPU program compiled on a CPU host gets the TPU's form. Else `model_cfg`."""
  if platform == "cpu" or conv_weight_grad_of(model_cfg) != "auto":
    return model_cfg
  resolved = ml_collections.ConfigDict(model_cfg.to_dict())
  resolved.conv_weight_grad = "xla"
  return resolved


def conv_weight_grad_of(cfg) -> str:
  """A model config's `conv_weight_grad` ('auto' when absent), checked."""
  return _checked(str(cfg.get("conv_weight_grad", "auto")))


def _checked(mode: str) -> str:
  if mode not in CONV_WEIGHT_GRAD:
    raise ValueError(f"model.conv_weight_grad must be one of {', '.join(CONV_WEIGHT_GRAD)}, "
                     f"got {mode!r}")
  return mode


def _conv(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)


def _chunk_rows(rows: int, row_bytes: int, chunk_bytes: int) -> int:
  """Rows per chunk: at most chunk_bytes' worth, preferably a divisor of `rows` (no
  remainder chunk, a smaller program)."""
  r = int(max(1, min(rows, chunk_bytes // max(row_bytes, 1))))
  d = r
  while rows % d:
    d -= 1
  return d if 2 * d >= r else r


def conv_weight_grad_matmul(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                            strides: Sequence[int], pads,
                            chunk_bytes: int | None = None) -> jax.Array:
  """The weight gradient of an NHWC x HWIO convolution (no dilation, one group), float32.

  dW[a, b, i, o] = sum over n, y, x of xpad[n, s*y + a, s*x + b, i] * dy[n, y, x, o]. One
  side is unrolled into columns (im2col: a block of rows per tap), the other is its matmul
  partner, and the sum runs over chunks of rows (each chunk's columns about `chunk_bytes`,
  default WEIGHT_GRAD_CHUNK_BYTES), so no image-sized temporary is made. At stride 1 the
  side with fewer channels is unrolled: dy shifted by each tap (padded to mirror x's
  padding) serves as well as x's windows. The unrolled side is first made channel-major
  (one transpose), so a chunk's columns are copies of contiguous rows and its matmul takes
  both operands as XLA:CPU's fast matmul wants them ((M, K) x (K, N)).
  """
  kh, kw, cin, cout = kernel_shape
  n = x.shape[0]
  (pt, pb), (pl, pr) = pads
  sh, sw = strides
  to_cm = lambda a, p: jnp.pad(a.transpose(3, 0, 1, 2), ((0, 0), (0, 0), *p))
  if sh == sw == 1 and cout <= cin and max(pt, pb) < kh and max(pl, pr) < kw:
    # Columns of dy: x row y meets dy row y + pt - a for tap row a.
    src = to_cm(dy, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    other, cols_c, other_c = x, cout, cin
    taps = [(kh - 1 - a, kw - 1 - b) for a in range(kh) for b in range(kw)]
  else:
    src = to_cm(x, pads)
    other, cols_c, other_c = dy, cin, cout
    taps = [(a, b) for a in range(kh) for b in range(kw)]
  rows, width = other.shape[1], other.shape[2]
  ncols = kh * kw * cols_c
  r = _chunk_rows(rows, n * width * ncols * x.dtype.itemsize,
                  chunk_bytes or WEIGHT_GRAD_CHUNK_BYTES)

  def chunk(acc, start, size):
    # One dynamic slice (the chunk's rows and the kernel's reach), then a static (strided)
    # slice per tap: a smaller program than a dynamic slice per tap.
    win = jax.lax.dynamic_slice_in_dim(src, sh * start, sh * (size - 1) + kh, axis=2)
    cols = [jax.lax.slice(win, (0, 0, a, b),
                          (cols_c, n, a + sh * (size - 1) + 1, b + sw * (width - 1) + 1),
                          (1, 1, sh, sw)) for a, b in taps]
    cols = jnp.concatenate(cols, 0).reshape(ncols, -1)  # (taps * cols_c, n * size * width)
    part = jax.lax.dynamic_slice_in_dim(other, start, size, axis=1).reshape(-1, other_c)
    return acc + jnp.matmul(cols, part, preferred_element_type=jnp.float32)

  acc = jnp.zeros((ncols, other_c), jnp.float32)
  n_full, rem = divmod(rows, r)
  if n_full == 1:
    acc = chunk(acc, 0, r)
  elif n_full > 1:
    acc = jax.lax.fori_loop(0, n_full, lambda i, acc: chunk(acc, i * r, r), acc)
  if rem:
    acc = chunk(acc, n_full * r, rem)
  acc = acc.reshape(kh, kw, cols_c, other_c)
  return acc.transpose(0, 1, 3, 2) if other is x else acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_weight_grad(x, w, strides, pads):
  return _conv(x, w, strides, pads)


def _conv_mwg_fwd(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _conv_mwg_bwd(strides, pads, res, dy):
  x, w = res
  dx, = jax.vjp(lambda x: _conv(x, w, strides, pads), x)[1](dy)  # XLA's input gradient
  dw = conv_weight_grad_matmul(x, dy, w.shape, strides, pads)
  return dx, dw.astype(w.dtype)


_conv_matmul_weight_grad.defvjp(_conv_mwg_fwd, _conv_mwg_bwd)


def _explicit_pads(padding, x_shape, w_shape, strides):
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1), padding="VALID",
           weight_grad: str = "xla") -> jax.Array:
  """lax.conv_general_dilated(x, w, strides, padding) in NHWC x HWIO, the same forward pass
  in every mode; `weight_grad` (CONV_WEIGHT_GRAD) picks how the weight gradient is computed.
  Padding: 'VALID', 'SAME' or ((top, bottom), (left, right))."""
  strides = tuple(int(s) for s in strides)
  if conv_weight_grad_impl(weight_grad, x.shape, w.shape) == "xla":
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)
  pads = _explicit_pads(padding, x.shape, w.shape, strides)
  if min(min(p) for p in pads) < 0:  # cropping: not a case of the matmul form
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)
  return _conv_matmul_weight_grad(x, w, strides, pads)


@dataclasses.dataclass(frozen=True)
class ConvFn:
  """For nn.Conv's `conv_general_dilated_cls`: returns a lax.conv_general_dilated with this
  weight-gradient formulation (cases other than a plain NHWC convolution stay XLA's)."""
  weight_grad: str = "xla"

  def __call__(self):
    return functools.partial(_flax_conv, weight_grad=self.weight_grad)


_NHWC_SPECS = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _flax_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, *,
               weight_grad="xla"):
  plain = (lhs.ndim == 4 and feature_group_count == 1 and precision is None
           and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
           and dimension_numbers in (_NHWC_SPECS, _DN))
  if plain:
    return conv2d(lhs, rhs, window_strides, padding, weight_grad)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision)


def conv3x3(features: int, stride: int = 1, name: str | None = None,
            weight_grad: str = "xla") -> nn.Conv:
  """nn.Conv2d(k=3, padding=1) with bias, in NHWC, with PyTorch's weight initialisation.

  `weight_grad`: CONV_WEIGHT_GRAD (the params are the same in every mode)."""
  return nn.Conv(features, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                 kernel_init=TORCH_KERNEL_INIT, name=name,
                 conv_general_dilated_cls=None if weight_grad == "xla" else ConvFn(weight_grad))


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

  XLA:CPU runs depthwise (feature-grouped) convolutions an order of magnitude slower than
  these elementwise adds of shifted slices.
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


def clamp(x, limit: float):
  """StyleGAN2-ADA's conv_clamp: outputs clipped to +-limit; 0: none (rosinality's)."""
  return jnp.clip(x, -limit, limit) if limit else x


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
  weight_grad: str = "xla"  # CONV_WEIGHT_GRAD

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    k = self.kernel_size
    w = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features), jnp.float32)
    scale = 1.0 / math.sqrt(cin * k * k)
    y = conv2d(x, (w * scale).astype(x.dtype), (self.stride, self.stride),
               [(self.padding, self.padding)] * 2, self.weight_grad)
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
