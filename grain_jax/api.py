"""The public inference API: `grain_jax.load(DIR)` -> a `Grain` with jitted NHWC methods."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from grain_jax import weights as weights_lib
from grain_jax.model import GRAIN, NETWORKS

# What each method needs, by network name (as recorded in grain_weights.json).
NEEDS = {
    "downscale": ("rescaler",),
    "upscale": ("rescaler", "fea2code", "generator", "fusion"),
    "generate": ("generator",),
    "discriminate": ("discriminator",),
    "identity": ("irse50",),
    "lpips": ("lpips",),
}
# The convert_weights.py flag that provides each network.
FLAG = {"rescaler": "--invrrdb", "fea2code": "--codestylegan", "generator": "--stylegan2",
        "fusion": "--fusion", "discriminator": "--discriminator", "irse50": "--irse50",
        "lpips": "--lpips"}


class Grain:
  """Converted GRAIN networks with jitted methods; all arrays are NHWC float32 in [-1, 1].

  Methods are available when the weights they need were converted (see `networks`).
  """

  def __init__(self, tree: dict, model_cfg, networks, meta: dict | None = None,
               compute_dtype: str | None = None):
    if compute_dtype is not None:  # run-time choice: the weights stay float32
      model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
      model_cfg.compute_dtype = compute_dtype
    self.config = model_cfg
    self.networks = frozenset(networks)
    self.meta = meta or {}
    self.model = GRAIN.from_config(model_cfg, [n for n in NETWORKS if n in self.networks])
    self.hr_size = int(model_cfg.hr_size)
    self.lr_size = int(model_cfg.lr_size)
    put = lambda t: jax.tree_util.tree_map(jnp.asarray, t)
    self.variables = put(tree.get("grain", {}))
    self._others = {k: put(v) for k, v in tree.items() if k != "grain"}
    m = self.model
    self._downscale = jax.jit(lambda v, x, q: m.apply(v, x, quantized=q, method=m.downscale),
                              static_argnums=2)
    self._upscale = jax.jit(lambda v, lr: m.apply(v, lr, method=m.upscale))
    self._generate = jax.jit(lambda v, w: m.apply(v, w, method=m.generate))
    self._disc = self._lpips = self._identity = None
    if "discriminator" in self.networks:
      from grain_jax.discriminators import StyleGAN2Discriminator
      d = StyleGAN2Discriminator(self.hr_size, tuple(model_cfg.discriminator.channels),
                                 tuple(model_cfg.generator.blur_kernel))
      self._disc = jax.jit(d.apply)
    if "irse50" in self.networks:
      from grain_jax.irse50 import IRSE50
      self._identity = jax.jit(IRSE50().apply)
    if "lpips" in self.networks:
      from grain_jax.lpips import LPIPS
      self._lpips = jax.jit(LPIPS().apply)

  def require(self, method: str) -> None:
    """Raises RuntimeError naming the convert flags if `method`'s weights are absent."""
    missing = [n for n in NEEDS[method] if n not in self.networks]
    if missing:
      flags = ", ".join(f"{n} ({FLAG[n]})" for n in missing)
      raise RuntimeError(f"{method} needs weights that this checkpoint lacks: {flags}; "
                         f"convert them with convert_weights.py")

  @staticmethod
  def _images(x, size: int, what: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      raise ValueError(f"{what}: expected a batch (N, {size}, {size}, 3), got {x.shape}; "
                       f"add a leading batch axis")
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f"{what}: expected NHWC images of shape (N, {size}, {size}, 3), "
                       f"got {tuple(x.shape)}")
    return x

  def downscale(self, x, quantize: bool = True) -> jax.Array:
    """HR images (N, hr, hr, 3) -> LR (N, lr, lr, 3), on the 8-bit grid unless quantize=False."""
    self.require("downscale")
    return self._downscale(self.variables, self._images(x, self.hr_size, "downscale"),
                           bool(quantize))

  def upscale(self, lr) -> dict[str, jax.Array]:
    """LR (N, lr, lr, 3) -> dict(hr, hr_inv, hr_gan, codes), constant generator noise."""
    self.require("upscale")
    return self._upscale(self.variables, self._images(lr, self.lr_size, "upscale"))

  def generate(self, w_plus) -> jax.Array:
    """W+ codes (N, n_latent, style_dim) -> images (N, hr, hr, 3), constant noise."""
    self.require("generate")
    w = jnp.asarray(w_plus, jnp.float32)
    want = (self.model.generator.n_latent, int(self.config.generator.style_dim))
    if w.ndim != 3 or w.shape[1:] != want:
      raise ValueError(f"generate: expected W+ codes of shape (N, {want[0]}, {want[1]}), "
                       f"got {tuple(w.shape)}")
    return self._generate(self.variables, w)

  def discriminate(self, img) -> jax.Array:
    """StyleGAN2 discriminator logits (N, 1) of images (N, hr, hr, 3)."""
    self.require("discriminate")
    return self._disc(self._others["discriminator"],
                      self._images(img, self.hr_size, "discriminate"))

  def identity(self, x112) -> jax.Array:
    """IR-SE50 embeddings (N, 512), L2-normalised, of aligned 112x112 crops."""
    self.require("identity")
    return self._identity(self._others["irse50"], self._images(x112, 112, "identity"))

  @property
  def lpips_params(self):
    """The LPIPS variables of this checkpoint (needs --lpips at conversion)."""
    self.require("lpips")
    return self._others["lpips"]

  def lpips(self, a, b) -> jax.Array:
    """LPIPS (AlexNet) distance per image pair, shape (N,)."""
    self.require("lpips")
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
      raise ValueError(f"lpips: expected two NHWC batches of equal shape, got "
                       f"{tuple(a.shape)} and {tuple(b.shape)}")
    return self._lpips(self._others["lpips"], a, b)


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Keeps compiled XLA programs on disk, so a second run skips most compilation.

  The command-line tools call this. The directory is `directory`, else $GRAIN_JAX_CACHE,
  else ~/.cache/grain_jax/xla; a cache the user configured for JAX is left as it is, and
  GRAIN_JAX_CACHE=off turns it off. Returns the directory in use (None if off).
  """
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = directory or os.environ.get("GRAIN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "grain_jax", "xla")
  if directory == "off":
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return directory


def load(directory: str, compute_dtype: str | None = None) -> Grain:
  """Loads a converted-weights directory (convert_weights.py) or a training workdir (its
  latest weights, WORKDIR/weights; WORKDIR/best holds the best validated ones).

  compute_dtype: 'float32' (default) or 'bfloat16' (mixed precision: about twice as fast on
  GPUs and TPUs, within about 0.1 dB PSNR; see the README).
  """
  if (not os.path.exists(os.path.join(directory, weights_lib.META))
      and os.path.exists(os.path.join(directory, "weights", weights_lib.META))):
    directory = os.path.join(directory, "weights")
  tree, cfg, meta = weights_lib.load_weights(directory)
  return Grain(tree, cfg, meta["networks"], meta, compute_dtype)
