"""The composed GRAIN model: downscale(x) -> lr, upscale(lr) -> hr_inv, hr_gan, hr, codes.

    x --Rescaler.encode--> lr_float --quantize--> lr --Rescaler.decode--> hr_inv, features
    features --Fea2Code (+ latent_avg)--> W+ codes --StyleGAN2 G--> hr_gan, G features
    (decoder features, G features) --Fusion--> hr
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.fea2code import Fea2Code
from grain_jax.fusion import Fusion
from grain_jax.rescaler import Rescaler, quantize
from grain_jax.stylegan2 import Generator


NETWORKS = ("rescaler", "fea2code", "generator", "fusion")


class GRAIN(nn.Module):
  """Rescaler + Fea2Code + StyleGAN2 generator + Fusion, built from one model config.

  Variables: {'params': {'rescaler', 'fea2code', 'generator', 'fusion'},
              'buffers': {'generator': {noise_i, latent_avg}}}. A method only needs the
  variables of the networks it runs (e.g. `downscale` only the rescaler's).
  """
  rescaler: Rescaler | None
  fea2code: Fea2Code | None
  generator: Generator | None
  fusion: Fusion | None
  start_from_latent_avg: bool = True

  @classmethod
  def from_config(cls, cfg, networks=NETWORKS) -> "GRAIN":
    """Builds the networks named in `networks` (others are None) from a model config.

    Only the parts built are validated, so e.g. a rescaler-only checkpoint may use a config
    whose generator sizes would not fit.
    """
    build = {"rescaler": Rescaler.from_config, "fea2code": Fea2Code.from_config,
             "generator": Generator.from_config, "fusion": Fusion.from_config}
    parts = {name: (fn(cfg) if name in networks else None) for name, fn in build.items()}
    return cls(**parts, start_from_latent_avg=bool(cfg.fea2code.start_from_latent_avg))

  def downscale(self, x, rng=None, quantized: bool = True):
    """x (N, H, W, 3) in [-1, 1] -> LR; quantized to 8-bit levels (noise if rng is given)."""
    lr_float = self.rescaler.encode(x)
    return quantize(lr_float, rng) if quantized else lr_float

  def codes(self, features):
    """Decoder features -> W+ codes (N, n_latent, style_dim), latent_avg added."""
    codes = self.fea2code(features)
    if self.start_from_latent_avg:
      codes = codes + self.generator.latent_avg.value
    return codes

  def upscale(self, lr, noise="const"):
    """lr (N, h, w, 3) -> dict(hr_inv, hr_gan, hr, codes) (no hr if built without Fusion)."""
    hr_inv, features = self.rescaler.decode(lr)
    codes = self.codes(features)
    hr_gan, _, g_features = self.generator([codes], input_is_latent=True, noise=noise,
                                           return_features=True)
    out = dict(hr_inv=hr_inv, hr_gan=hr_gan, codes=codes)
    if self.fusion is not None:
      out["hr"] = self.fusion(features, g_features)
    return out

  def generate(self, w_plus, noise="const"):
    """W+ codes (N, n_latent, style_dim) -> image, with the generator's constant noise."""
    return self.generator([w_plus], input_is_latent=True, noise=noise)[0]

  def __call__(self, x, rng=None, noise="const"):
    """The whole round trip (training forward): dict(lr_float, lr, hr_inv, hr_gan, hr, codes)."""
    lr_float = self.rescaler.encode(x)
    lr = quantize(lr_float, rng)
    if self.fea2code is None:  # a rescaler-only model (training stage 1)
      return dict(lr_float=lr_float, lr=lr, hr_inv=self.rescaler.decode(lr)[0])
    out = self.upscale(lr, noise)
    return dict(lr_float=lr_float, lr=lr, **out)


def init_variables(model: GRAIN, seed: int, hr_size: int, batch: int = 1):
  """Fresh random variables for the networks of `model`.

  Uses an RngBitGenerator key ('unsafe_rbg'): XLA:CPU compiles the per-parameter random
  initialisers about 4x faster than with the default threefry key (small config: ~30 s
  instead of ~2 min), and initial weights need no cross-platform reproducibility.
  """
  rng = jax.random.key(seed, impl="unsafe_rbg")
  return jax.jit(model.init)(rng, jnp.zeros((batch, hr_size, hr_size, 3), jnp.float32))


def placeholder_variables(model: GRAIN, hr_size: int, seed: int = 0):
  """Variables of the right shapes and small random values, made on the host in seconds.

  For timing and memory measurements only (the cost does not depend on the values): it
  skips compiling Flax's random initialisers, which takes minutes at 1024 on a CPU.
  """
  import numpy as np

  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, hr_size, hr_size, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
