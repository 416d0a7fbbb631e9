"""GRAIN's quantizer: the LR image on the 8-bit grid, and its exact uint8 form.

v = (x + 1) / 2 * 255 on the 0..255 scale. Inference rounds and clamps, so the LR image is
exactly what an 8-bit PNG stores; training adds U(-0.5, 0.5) instead (gradients flow through
the noise) and clamps. Back to [-1, 1] by (v / 255 - 0.5) / 0.5, the original's operations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_levels(x: jax.Array) -> jax.Array:
  """[-1, 1] -> the 0..255 scale, in the original's order of operations."""
  return (x + 1.0) / 2.0 * 255.0


def from_levels(v: jax.Array) -> jax.Array:
  return (v / 255.0 - 0.5) / 0.5


# The 256 LR values exactly as the original computes them in float32. XLA may rewrite
# `v / 255` as `v * (1/255)`, which is off by an ulp; a table keeps 8-bit LR images bit-exact.
LEVEL_VALUES = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5))
                / np.float32(0.5)).astype(np.float32)


def quantize(x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """GRAIN's quantizer: exactly 8-bit values at inference, uniform noise in training.

  With `rng=None`, rounds to the 8-bit grid (half to even) and clamps to [0, 255]: the LR
  image is then exactly what an 8-bit PNG stores. With an rng, adds U(-0.5, 0.5) on the
  0..255 scale and clamps (the training form; gradients flow through the noise).
  """
  if rng is None:
    idx = jnp.clip(jnp.round(to_levels(x)), 0, 255).astype(jnp.int32)
    return jnp.asarray(LEVEL_VALUES, x.dtype)[idx]
  return quantize_with_noise(x, jax.random.uniform(rng, x.shape, x.dtype, -0.5, 0.5))


def quantize_with_noise(x: jax.Array, noise: jax.Array) -> jax.Array:
  """The training quantizer with given U(-0.5, 0.5) noise (on the 0..255 scale), clamped."""
  return from_levels(jnp.clip(to_levels(x) + noise, 0.0, 255.0))


def lr_to_uint8(lr: jax.Array) -> np.ndarray:
  """A quantized LR image in [-1, 1] as uint8 (exact: lr holds 8-bit levels)."""
  return np.asarray(np.clip(np.round(to_levels(np.asarray(lr, np.float32))), 0, 255), np.uint8)


def uint8_to_lr(u8: np.ndarray) -> np.ndarray:
  """uint8 pixels -> [-1, 1] float32, the values `quantize` produces for those levels."""
  return LEVEL_VALUES[np.asarray(u8, np.uint8)]
