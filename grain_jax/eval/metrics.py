"""Image quality metrics in JAX, per image, on 8-bit RGB images held as floats in [0, 255].

Conventions (those of most super-resolution papers, and of scikit-image with the arguments
below, which the tests check on the same arrays):
- PSNR over all pixels and the three RGB channels, data range 255:
  `skimage.metrics.peak_signal_noise_ratio(a, b, data_range=255)`, except that identical
  images give PSNR_MAX (100 dB) instead of inf, so that means stay finite (and JSON strict).
- SSIM of Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, population
  covariances, computed per RGB channel and averaged, borders where the window does not fit
  left out: `skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
No Y-channel conversion and no border crop (GRAIN's outputs are full faces).

METRICS is the table of the metrics an evaluation reports per output (evaluator.py computes
them, report.py and evaluate.py's summary show them): a new per-image metric is one row there.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.nets.irse50 import identity_embedding
from grain_jax.nets.lpips import LPIPS
from grain_jax.nets.quantizer import quantize

DATA_RANGE = 255.0
PSNR_MAX = 100.0
SSIM_SIGMA = 1.5
# skimage truncates its Gaussian at 3.5 sigma: radius int(3.5 * 1.5 + 0.5) = 5, 11 taps.
SSIM_WIN = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image PSNR (N,) in dB of (N, H, W, C) images in [0, 255]."""
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
  return jnp.minimum(10.0 * jnp.log10(DATA_RANGE ** 2 / mse), PSNR_MAX)


def _gaussian_taps() -> np.ndarray:
  r = SSIM_WIN // 2
  g = np.exp(-0.5 * (np.arange(-r, r + 1) / SSIM_SIGMA) ** 2)
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x: jax.Array) -> jax.Array:
  """Separable Gaussian filter of (N, H, W, C) keeping only positions where it fits."""
  taps = _gaussian_taps()
  k = len(taps)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  # Shifted multiply-adds: cheaper than depthwise convolutions on XLA:CPU, exact enough.
  x = sum(float(t) * x[:, i:i + h] for i, t in enumerate(taps))
  return sum(float(t) * x[:, :, i:i + w] for i, t in enumerate(taps))


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image SSIM (N,) of (N, H, W, C) images in [0, 255]; H, W >= 11."""
  if min(a.shape[1:3]) < SSIM_WIN:
    raise ValueError(f"SSIM needs images of at least {SSIM_WIN}x{SSIM_WIN}, got {a.shape[1:3]}")
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  c1 = (0.01 * DATA_RANGE) ** 2
  c2 = (0.03 * DATA_RANGE) ** 2
  mu_a, mu_b = _filter_valid(a), _filter_valid(b)
  var_a = _filter_valid(a * a) - mu_a * mu_a
  var_b = _filter_valid(b * b) - mu_b * mu_b
  cov = _filter_valid(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
       / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)))
  return jnp.mean(s, axis=(1, 2, 3))


def bicubic_resize(x: jax.Array, size: int) -> jax.Array:
  """Antialiased bicubic resize (Keys, a = -0.5) of (N, H, W, C) to size x size."""
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, size, size, c), method="bicubic", antialias=True)


def bicubic_baseline(x: jax.Array, lr_size: int) -> tuple[jax.Array, jax.Array]:
  """The plain baseline GRAIN is compared with: (an 8-bit LR made by bicubic downscaling,
  its bicubic upscale back to x's size)."""
  lr = quantize(bicubic_resize(x, lr_size))
  return lr, bicubic_resize(lr, x.shape[1])


# ------------------------------------------------------------------------------ the table

def _signed(a: jax.Array) -> jax.Array:
  return a / 127.5 - 1.0  # 8-bit levels as the networks' [-1, 1]


def _lpips(nets: dict, out: jax.Array, gt: jax.Array) -> jax.Array:
  return LPIPS().apply(nets["lpips"], _signed(out), _signed(gt))


def _identity(nets: dict, out: jax.Array, gt: jax.Array) -> jax.Array:
  e, e_gt = (identity_embedding(nets["irse50"], _signed(a)) for a in (out, gt))
  return jnp.sum(e * e_gt, -1) / (jnp.linalg.norm(e, axis=-1) * jnp.linalg.norm(e_gt, axis=-1))


@dataclasses.dataclass(frozen=True)
class Metric:
  """One metric of each judged output: key {output}_{name} in metrics.json and per_image.csv."""
  name: str
  per_image: Callable | None  # (networks' variables, 8-bit output, 8-bit input) -> (N,);
                              # None: a set metric (FID/KID, from evaluate.set_metrics)
  digits: int                 # decimals shown
  network: str | None = None  # the metric network it runs (evaluator.METRIC_NETWORKS)
  switch: str = ""            # the option that turns it off (evaluator.OFF_REASONS key);
                              # default: its name
  label: str = ""             # as shown; default NAME
  doc: str = ""


METRICS = {row.name: row for row in (
    Metric("psnr", lambda nets, a, b: psnr(a, b), 2, doc="dB, 8-bit RGB"),
    Metric("ssim", lambda nets, a, b: ssim(a, b), 4, doc="11x11 Gaussian window"),
    Metric("lpips", _lpips, 4, network="lpips", doc="LPIPS AlexNet v0.1"),
    Metric("id", _identity, 4, network="irse50", doc="cosine of IR-SE50 embeddings"),
    Metric("fid", None, 2, network="inception", doc="Frechet Inception distance (set)"),
    Metric("kid", None, 4, network="inception", switch="fid",
           doc="kernel Inception distance (set)"),
)}
