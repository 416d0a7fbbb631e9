"""StyleGAN2 generator (rosinality's stylegan2-pytorch, config-f), NHWC, in Flax linen.

Variables: 'params' (the trainable weights, stored as in PyTorch: equalized learning rate is
applied at run time) and 'buffers' (constant noise maps `noise_i` (1, R, R, 1) and the
`latent_avg` W vector of the checkpoint). GRAIN keeps this network frozen.

Modulated convolutions are computed as "scale the input by the style, one convolution shared
by the whole batch, scale the output by the demodulation factor" (`modconv_impl='scale'`),
which equals the original's per-sample grouped convolution (`'grouped'`, kept for tests) up to
float rounding and runs several times faster in XLA. Upsampling convolutions are transposed
convolutions computed phase by phase (no multiplications with inserted zeros), then blurred.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.nets.layers import (EqualLinear, FusedLeakyReLU, blur, check_fir_buffer, clamp,
                                   separable_taps, upfirdn2d)
from grain_jax.nets.torch_import import CheckpointError, TorchReader

_DN = ("NHWC", "HWIO", "NHWC")


def default_channels(size: int, channel_multiplier: int = 2) -> tuple[int, ...]:
  """rosinality's channel table for resolutions 4, 8, ..., size."""
  table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
           128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
           512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
  return tuple(table[2 ** i] for i in range(2, int(math.log2(size)) + 1))


def generator_channels(cfg) -> tuple[int, ...]:
  """model.generator.channels of a model config; () = rosinality's widths for hr_size."""
  return tuple(cfg.generator.channels) or default_channels(int(cfg.hr_size))


def conv_transpose_stride2(x: jax.Array, w: jax.Array) -> jax.Array:
  """torch conv_transpose2d(x, w^T, stride=2, padding=0) for a 3x3 HWIO kernel, plus padding.

  Returns (N, 2H+2, 2W+2, Cout): the (2H+1)^2 transposed-convolution output followed by one
  zero row and column. Computed as four phase convolutions on the input: output row 2a uses
  input rows a-1 (tap 2) and a (tap 0), row 2a+1 only row a (tap 1). So each input pixel
  meets each of the 9 taps once and no work is spent on the zeros a dilated convolution
  would insert.
  """
  n, h, wd, _ = x.shape
  cout = w.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Per parity: (taps in window order, offset into the padded input).
  phase = {0: ((2, 0), 0), 1: ((1,), 1)}
  rows = []
  for py in (0, 1):
    ty, oy = phase[py]
    cols = []
    for px in (0, 1):
      tx, ox = phase[px]
      k = w[np.ix_(ty, tx)]  # (len(ty), len(tx), Cin, Cout)
      xs = xp[:, oy:oy + h + len(ty), ox:ox + wd + len(tx)]
      cols.append(jax.lax.conv_general_dilated(xs, k, (1, 1), "VALID", dimension_numbers=_DN))
    rows.append(jnp.stack(cols, axis=3))  # (N, H+1, W+1, 2, C)
  out = jnp.stack(rows, axis=2)  # (N, H+1, 2, W+1, 2, C)
  return out.reshape(n, 2 * h + 2, 2 * wd + 2, cout)


def conv_transpose_stride2_dilated(x: jax.Array, w: jax.Array) -> jax.Array:
  """Reference form of `conv_transpose_stride2` (zero-dilated input, flipped kernel)."""
  out = jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), ((2, 2), (2, 2)),
                                     lhs_dilation=(2, 2), dimension_numbers=_DN)
  return jnp.pad(out, ((0, 0), (0, 1), (0, 1), (0, 0)))


def modulated_conv2d(x: jax.Array, weight: jax.Array, style: jax.Array, demodulate: bool = True,
                     upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                     impl: str = "scale") -> jax.Array:
  """StyleGAN2's modulated convolution, NHWC.

  weight: (k, k, Cin, Cout), already multiplied by its equalized-lr scale; style: (N, Cin).
  impl='scale': x * style -> shared conv -> * demod (fast). impl='grouped': per-sample
  modulated weights, one convolution per sample (the original's formulation).
  """
  k = weight.shape[0]
  if impl == "grouped":
    w = weight[None] * style[:, None, None, :, None]
    if demodulate:
      w = w * jax.lax.rsqrt(jnp.sum(w * w, axis=(1, 2, 3)) + 1e-8)[:, None, None, None, :]

    def one(xi, wi):
      if upsample:
        return conv_transpose_stride2_dilated(xi[None], wi)[0]
      return jax.lax.conv_general_dilated(xi[None], wi, (1, 1), [(k // 2, k // 2)] * 2,
                                          dimension_numbers=_DN)[0]

    out = jax.vmap(one)(x, w)
  else:
    xs = x * style[:, None, None, :].astype(x.dtype)
    w = weight.astype(x.dtype)
    if upsample:
      out = conv_transpose_stride2(xs, w)
    else:
      out = jax.lax.conv_general_dilated(xs, w, (1, 1), [(k // 2, k // 2)] * 2,
                                         dimension_numbers=_DN)
    if demodulate:
      wsq = jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=(0, 1))  # (Cin, Cout)
      d = jax.lax.rsqrt(jnp.square(style.astype(jnp.float32)) @ wsq + 1e-8)
      out = out * d[:, None, None, :].astype(out.dtype)
  if upsample:
    # The transposed conv gives 2H+1 (+1 zero row/col here); Blur(pad=(1,1)) brings it to 2H.
    out = blur(out, blur_kernel, pad=(1, 0), gain=4.0)
  return out


class ModulatedConv2d(nn.Module):
  features: int
  kernel_size: int
  demodulate: bool = True
  upsample: bool = False
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  impl: str = "scale"

  @nn.compact
  def __call__(self, x, w):
    cin = x.shape[-1]
    k = self.kernel_size
    weight = self.param("weight", nn.initializers.normal(1.0), (k, k, cin, self.features))
    style = EqualLinear(cin, bias_init=1.0, name="modulation")(w)
    scale = 1.0 / math.sqrt(cin * k * k)
    return modulated_conv2d(x, weight * scale, style, self.demodulate, self.upsample,
                            self.blur_kernel, self.impl)


class StyledConv(nn.Module):
  """Modulated conv, noise injection (learned strength), fused leaky ReLU[, clamp]."""
  features: int
  upsample: bool = False
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  impl: str = "scale"
  conv_clamp: float = 0.0

  @nn.compact
  def __call__(self, x, w, noise):
    out = ModulatedConv2d(self.features, 3, True, self.upsample, self.blur_kernel, self.impl,
                          name="conv")(x, w)
    strength = self.param("noise_weight", nn.initializers.zeros, (1,))
    out = out + (strength * noise).astype(out.dtype)
    return clamp(FusedLeakyReLU(name="activate")(out), self.conv_clamp)


class ToRGB(nn.Module):
  """1x1 modulated conv (no demodulation) + bias[, clamp], plus the FIR-upsampled previous RGB."""
  upsample: bool = True
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  impl: str = "scale"
  conv_clamp: float = 0.0

  @nn.compact
  def __call__(self, x, w, skip=None):
    out = ModulatedConv2d(3, 1, False, False, self.blur_kernel, self.impl, name="conv")(x, w)
    out = out + self.param("bias", nn.initializers.zeros, (3,)).astype(out.dtype)
    out = clamp(out, self.conv_clamp)
    if skip is not None:
      k = len(self.blur_kernel)
      # rosinality Upsample(factor 2): kernel * 4, pad ((k-2+1)//2 + 1, (k-2)//2).
      skip = upfirdn2d(skip, separable_taps(self.blur_kernel, 4.0), up=2,
                       pad=((k - 1) // 2 + 1, (k - 2) // 2))
      out = out + skip
    return out


class Generator(nn.Module):
  """rosinality Generator(size, style_dim, n_mlp, channel_multiplier, blur_kernel, lr_mlp).

  `channels[i]` is the width at resolution 4 * 2**i (see `default_channels`).
  """
  size: int = 1024
  style_dim: int = 512
  n_mlp: int = 8
  channels: Sequence[int] = default_channels(1024)
  lr_mlp: float = 0.01
  blur_kernel: Sequence[float] = (1, 3, 3, 1)
  impl: str = "scale"
  remat: bool = False  # rematerialise each StyledConv in the backward pass
  # StyleGAN2-ADA's conv_clamp (its pickles: nets/ada_pickle.py): each StyledConv's and
  # ToRGB's output clipped to +-conv_clamp; 0 = none (rosinality's).
  conv_clamp: float = 0.0

  @property
  def log_size(self) -> int:
    return int(math.log2(self.size))

  @property
  def n_latent(self) -> int:
    return self.log_size * 2 - 2

  @property
  def num_layers(self) -> int:
    return (self.log_size - 2) * 2 + 1

  def noise_shapes(self) -> list[tuple[int, ...]]:
    return [(1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), 1) for i in range(self.num_layers)]

  def setup(self):
    if len(self.channels) != self.log_size - 1:
      raise ValueError(f"generator.channels needs one width per resolution 4..{self.size} "
                       f"({self.log_size - 1}), got {len(self.channels)}")
    self.style = [EqualLinear(self.style_dim, lr_mul=self.lr_mlp, activation=True,
                              name=f"style_{i + 1}") for i in range(self.n_mlp)]
    self.input = self.param("input", nn.initializers.normal(1.0), (1, 4, 4, self.channels[0]))
    bk, cc = tuple(self.blur_kernel), float(self.conv_clamp)
    styled = nn.remat(StyledConv) if self.remat else StyledConv
    self.conv1 = styled(self.channels[0], False, bk, self.impl, cc)
    self.to_rgb1 = ToRGB(False, bk, self.impl, cc)
    convs, to_rgbs = [], []
    for c in self.channels[1:]:
      convs.append(styled(c, True, bk, self.impl, cc))
      convs.append(styled(c, False, bk, self.impl, cc))
      to_rgbs.append(ToRGB(True, bk, self.impl, cc))
    self.convs = convs
    self.to_rgbs = to_rgbs
    for i, shape in enumerate(self.noise_shapes()):
      setattr(self, f"noise_{i}", self.variable(
          "buffers", f"noise_{i}", lambda s=shape: jax.random.normal(self.make_rng("params"), s)))
    self.latent_avg = self.variable("buffers", "latent_avg", lambda: jnp.zeros((self.style_dim,)))

  def mapping(self, z: jax.Array) -> jax.Array:
    """z (N, style_dim) -> w: PixelNorm, then the n_mlp EqualLinear + fused LReLU layers."""
    x = z * jax.lax.rsqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + 1e-8)
    for layer in self.style:
      x = layer(x)
    return x

  def __call__(self, styles, input_is_latent: bool = False, truncation: float = 1.0,
               truncation_latent=None, inject_index=None, noise: str | Sequence = "const",
               return_features: bool = False):
    """Synthesises images, NHWC in about [-1, 1].

    styles: a list of one or two arrays: z or w (N, style_dim), or W+ (N, >= n_latent,
      style_dim).
      Two entries mix styles: codes < inject_index from the first, the rest from the second
      (inject_index may be a traced integer; if None, drawn with the 'mixing' rng).
    input_is_latent: styles are W / W+ (GRAIN) rather than z.
    truncation: psi; truncation_latent defaults to the checkpoint's latent_avg.
    noise: 'const' (the noises.noise_i buffers, randomize_noise=False), 'random' (fresh
      N(0,1) maps from the 'noise' rng), or a list of arrays (N or 1, R, R, 1).
    Returns (image, latent (N, n_latent, style_dim), features): features are the outputs of
    the second StyledConv of the last three resolutions (what GRAIN's Fusion consumes), or
    None unless return_features.
    """
    if not isinstance(styles, (list, tuple)):
      styles = [styles]
    if not input_is_latent:
      styles = [self.mapping(s) for s in styles]
    if truncation < 1:
      t_lat = self.latent_avg.value if truncation_latent is None else truncation_latent
      styles = [t_lat + truncation * (s - t_lat) for s in styles]
    n = styles[0].shape[0]

    def expand(s):
      return s if s.ndim == 3 else jnp.broadcast_to(s[:, None], (n, self.n_latent, s.shape[-1]))

    if len(styles) == 1:
      latent = expand(styles[0])
    else:
      if inject_index is None:
        inject_index = jax.random.randint(self.make_rng("mixing"), (), 1, self.n_latent)
      mask = (jnp.arange(self.n_latent) < inject_index)[None, :, None]
      latent = jnp.where(mask, expand(styles[0]), expand(styles[1]))
    if latent.shape[1] < self.n_latent:
      raise ValueError(f"W+ input needs {self.n_latent} codes, got {latent.shape[1]}")
    latent = latent[:, :self.n_latent]  # as rosinality's: codes beyond n_latent are not used

    if isinstance(noise, str):
      if noise == "const":
        noises = [getattr(self, f"noise_{i}").value for i in range(self.num_layers)]
      elif noise == "random":
        rng = self.make_rng("noise")
        noises = [jax.random.normal(k, (n,) + s[1:])
                  for k, s in zip(jax.random.split(rng, self.num_layers), self.noise_shapes())]
      else:
        raise ValueError(f"noise must be 'const', 'random' or a list of arrays, got {noise!r}")
    else:
      noises = list(noise)

    out = jnp.broadcast_to(self.input, (n,) + self.input.shape[1:])
    out = self.conv1(out, latent[:, 0], noises[0])
    skip = self.to_rgb1(out, latent[:, 1])
    feats = []
    for j, to_rgb in enumerate(self.to_rgbs):
      i = 1 + 2 * j
      out = self.convs[2 * j](out, latent[:, i], noises[i])
      out = self.convs[2 * j + 1](out, latent[:, i + 1], noises[i + 1])
      skip = to_rgb(out, latent[:, i + 2], skip)
      feats.append(out)
      self.sow("intermediates", f"rgb_{8 * 2 ** j}", skip)
    return skip, latent, (feats[-3:] if return_features else None)

  @classmethod
  def from_config(cls, cfg, impl: str | None = None) -> "Generator":
    g = cfg.generator
    return cls(cfg.hr_size, g.style_dim, g.n_mlp, generator_channels(cfg), g.lr_mlp,
               tuple(g.blur_kernel), impl or g.get("modconv_impl", "scale"),
               bool(cfg.get("remat", False)), float(g.get("conv_clamp", 0.0)))


def _styled_from_torch(rd: TorchReader, key: str) -> dict:
  w = rd.get(f"{key}.conv.weight")
  return {"conv": {"weight": None if w is None else np.transpose(w[0], (2, 3, 1, 0)),
                   "modulation": rd.dense(f"{key}.conv.modulation")},
          "noise_weight": rd.get(f"{key}.noise.weight"),
          "activate": {"bias": rd.get(f"{key}.activate.bias")}}


def _to_rgb_from_torch(rd: TorchReader, key: str) -> dict:
  w = rd.get(f"{key}.conv.weight")
  b = rd.get(f"{key}.bias")
  return {"conv": {"weight": None if w is None else np.transpose(w[0], (2, 3, 1, 0)),
                   "modulation": rd.dense(f"{key}.conv.modulation")},
          "bias": None if b is None else b.reshape(-1)}


def from_torch(rd: TorchReader, model: Generator) -> dict:
  """rosinality's g_ema state dict, plus the checkpoint's `latent_avg` under that key ->
  {'params', 'buffers'}. The FIR kernel buffers are checked against the configured blur kernel.
  """
  n_noise = sum(1 for k in rd.sd if k.startswith("noises.noise_"))
  if n_noise and n_noise != model.num_layers:
    size = 2 ** ((n_noise + 3) // 2)
    raise CheckpointError(
        f"{rd.what}: a {size}px generator, but the model config is for {model.size}px "
        f"(set --config.model.hr_size={size}, and --config.model.lr_size to match)")
  params = {f"style_{i}": rd.dense(f"style.{i}") for i in range(1, model.n_mlp + 1)}
  inp = rd.get("input.input")
  params["input"] = None if inp is None else np.transpose(inp, (0, 2, 3, 1))
  params["conv1"] = _styled_from_torch(rd, "conv1")
  params["to_rgb1"] = _to_rgb_from_torch(rd, "to_rgb1")
  for j in range(len(model.channels) - 1):
    for m in (2 * j, 2 * j + 1):
      params[f"convs_{m}"] = _styled_from_torch(rd, f"convs.{m}")
    params[f"to_rgbs_{j}"] = _to_rgb_from_torch(rd, f"to_rgbs.{j}")
    for key in (f"convs.{2 * j}.conv.blur.kernel", f"to_rgbs.{j}.upsample.kernel"):
      rd.problem(*check_fir_buffer(rd.sd.get(key), model.blur_kernel, 4.0, key))
      rd.ignore(key)
  buffers = {}
  for i in range(model.num_layers):
    v = rd.get(f"noises.noise_{i}")
    buffers[f"noise_{i}"] = None if v is None else np.transpose(v, (0, 2, 3, 1))
  v = rd.get("latent_avg")
  buffers["latent_avg"] = None if v is None else v.reshape(-1)
  return {"params": params, "buffers": buffers}
