"""The composed GRAIN model: downscale(x) -> lr, upscale(lr) -> hr_inv, hr_gan, hr, codes.

    x --InvRRDB.encode--> lr_float --quantize--> lr --InvRRDB.decode--> hr_inv, features
    features --Fea2Code (+ latent_avg)--> W+ codes --StyleGAN2 G--> hr_gan, G features
    (decoder features, G features) --Fusion--> hr
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.nets import registry
from grain_jax.nets.fea2code import Fea2Code
from grain_jax.nets.fusion import Fusion
from grain_jax.nets.invrrdb import InvRRDB
from grain_jax.nets.quantizer import quantize
from grain_jax.nets.registry import MODEL_NETWORKS
from grain_jax.nets.stylegan2 import Generator


class GRAIN(nn.Module):
  """Rescaler (InvRRDB) + Fea2Code + StyleGAN2 generator + Fusion, built from one model config.

  Variables: {'params': {'rescaler', 'fea2code', 'generator', 'fusion'},
              'buffers': {'generator': {noise_i, latent_avg}}} (`model_variables` makes them
  from per-network variables). A method only needs the variables of the networks it runs
  (e.g. `downscale` only the rescaler's).
  """
  rescaler: InvRRDB | None
  fea2code: Fea2Code | None
  generator: Generator | None
  fusion: Fusion | None
  hr_size: int
  lr_size: int
  start_from_latent_avg: bool = True
  # Mixed precision: the networks compute in this dtype (float32 or bfloat16). Parameters
  # stay float32 where they are kept (optimizer, checkpoints); `apply` casts a copy, so
  # gradients reach the float32 masters. The quantizer and the returned images are float32.
  # bfloat16 has float32's exponent range, so no loss scaling is needed.
  compute_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, cfg, parts=MODEL_NETWORKS) -> "GRAIN":
    """Builds the networks named in `parts` (others are None) from a model config.

    Only the parts built are validated, so e.g. a rescaler-only checkpoint may use a config
    whose generator sizes would not fit.
    """
    built = {name: (registry.build(name, cfg) if name in parts else None)
             for name in MODEL_NETWORKS}
    return cls(**built, hr_size=int(cfg.hr_size), lr_size=int(cfg.lr_size),
               start_from_latent_avg=bool(cfg.fea2code.start_from_latent_avg),
               compute_dtype=compute_dtype(cfg))

  @property
  def parts(self) -> tuple[str, ...]:
    """The networks this model was built with."""
    return tuple(n for n in MODEL_NETWORKS if getattr(self, n) is not None)

  def apply(self, variables, *args, **kwargs):
    """Module.apply with the float variables cast to `compute_dtype` (a no-op in float32)."""
    if self.compute_dtype != jnp.float32:
      variables = cast_floats(variables, self.compute_dtype)
    return super().apply(variables, *args, **kwargs)

  def _in(self, x):
    return x.astype(self.compute_dtype)

  def encode(self, x):
    """x (N, H, W, 3) in [-1, 1] -> the encoder's unquantized LR, float32."""
    return self.rescaler.encode(self._in(x)).astype(jnp.float32)

  def decode(self, lr):
    """LR -> (hr_inv float32, decoder features in compute_dtype)."""
    hr_inv, features = self.rescaler.decode(self._in(lr))
    return hr_inv.astype(jnp.float32), features

  def downscale(self, x, rng=None, quantized: bool = True):
    """x (N, H, W, 3) in [-1, 1] -> LR; quantized to 8-bit levels (noise if rng is given)."""
    lr_float = self.encode(x)
    return quantize(lr_float, rng) if quantized else lr_float

  def codes(self, features):
    """Decoder features -> W+ codes (N, fea2code.n_codes, style_dim), latent_avg added."""
    codes = self.fea2code(features)
    if self.start_from_latent_avg:
      codes = codes + self.generator.latent_avg.value.astype(codes.dtype)
    return codes

  def synthesize(self, features, noise="const"):
    """Decoder features -> (hr_gan float32, W+ codes float32, G features)."""
    codes = self.codes(features)
    if not isinstance(noise, str):
      noise = [self._in(n) for n in noise]
    hr_gan, _, g_features = self.generator([codes], input_is_latent=True, noise=noise,
                                           return_features=True)
    return hr_gan.astype(jnp.float32), codes.astype(jnp.float32), g_features

  def fuse(self, features, g_features):
    return self.fusion(features, g_features).astype(jnp.float32)

  def upscale(self, lr, noise="const"):
    """lr (N, h, w, 3) -> dict(hr_inv, hr_gan, hr, codes) (no hr if built without Fusion)."""
    hr_inv, features = self.decode(lr)
    hr_gan, codes, g_features = self.synthesize(features, noise)
    out = dict(hr_inv=hr_inv, hr_gan=hr_gan, codes=codes)
    if self.fusion is not None:
      out["hr"] = self.fuse(features, g_features)
    return out

  def generate(self, w_plus, noise="const"):
    """W+ codes (N, n_latent, style_dim) -> image, with the generator's constant noise."""
    img = self.generator([self._in(w_plus)], input_is_latent=True, noise=noise)[0]
    return img.astype(jnp.float32)

  def __call__(self, x, rng=None, noise="const"):
    """The whole round trip: dict(lr_float, lr, hr_inv, hr_gan, hr, codes); used to initialise
    the variables. The same steps as `downscale` then `upscale` (inference and evaluation),
    but rng draws the quantizer's noise. Training runs train.step.forward: these modules up
    to the stage's output, with noise drawn per example."""
    lr_float = self.encode(x)
    lr = quantize(lr_float, rng)
    if self.fea2code is None:  # a rescaler-only model (training stage 1)
      return dict(lr_float=lr_float, lr=lr, hr_inv=self.decode(lr)[0])
    out = self.upscale(lr, noise)
    return dict(lr_float=lr_float, lr=lr, **out)


def compute_dtype(cfg):
  """The model config's `compute_dtype` ('float32' when absent) as a JAX dtype."""
  name = str(cfg.get("compute_dtype", "float32"))
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model.compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def cast_floats(tree, dtype):
  """Casts the floating-point leaves of a pytree to dtype (others unchanged)."""
  return jax.tree_util.tree_map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def model_variables(per_network: dict) -> dict:
  """{network: variables} (the weights layout) -> the composed model's variables, for the
  model networks among them: {'params': {name: ...}, 'buffers': {'generator': ...}}."""
  out: dict = {"params": {}}
  for name in MODEL_NETWORKS:
    for collection, value in per_network.get(name, {}).items():
      out.setdefault(collection, {})[name] = value
  return out


def per_network_variables(variables: dict) -> dict:
  """The inverse of `model_variables`: {network: {'params': ...[, 'buffers': ...]}}."""
  out: dict = {}
  for collection, by_name in variables.items():
    for name, value in by_name.items():
      out.setdefault(name, {})[collection] = value
  return out


def init_variables(model: GRAIN, seed: int, batch: int = 1):
  """Fresh random variables for the networks of `model` (one compilation for all of them),
  drawn from registry.init_key(seed)."""
  hr = model.hr_size
  return jax.jit(model.init)(registry.init_key(seed),
                             jnp.zeros((batch, hr, hr, 3), jnp.float32))


def placeholder_values(abstract_tree, seed: int = 0):
  """Host arrays of small random values for an abstract variables tree (`jax.eval_shape` of
  an init), made in seconds; BatchNorm variances are 1 so the networks stay finite.

  For timing and memory measurements, and for states a checkpoint will overwrite: it skips
  compiling Flax's random initialisers, which takes minutes at 1024 on a CPU.
  """
  rng = np.random.default_rng(seed)

  def value(path, s):
    if getattr(path[-1], "key", None) == "var":  # BatchNorm running variance
      return np.ones(s.shape, s.dtype)
    return (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(value, abstract_tree)


def placeholder_variables(model: GRAIN, seed: int = 0):
  """`placeholder_values` of a GRAIN model's variables."""
  x = jax.ShapeDtypeStruct((1, model.hr_size, model.hr_size, 3), jnp.float32)
  return placeholder_values(jax.eval_shape(model.init, jax.random.key(0), x), seed)
