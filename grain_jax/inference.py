"""The public inference API: `grain_jax.load(DIR)` -> a `LoadedModel` with jitted NHWC methods."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from grain_jax.formats import images
from grain_jax.formats.weights import load_weights, weights_dir
from grain_jax.nets import registry
from grain_jax.nets.model import GRAIN, model_variables
from grain_jax.util.chunks import in_chunks

# What each method needs, by network name (registry.NETWORKS).
NEEDS = {
    "downscale": ("rescaler",),
    "upscale": registry.OUTPUT_NETWORKS["hr"],
    "generate": ("generator",),
    "discriminate": ("discriminator",),
    "identity": ("irse50",),
    "lpips": ("lpips",),
}


def rescale_functions(model: GRAIN, chunk: int = 0, shards: int = 1):
  """The pure functions that `grain-jax down|up`, the benchmarks and the TPU compiles jit:
  downscale(variables, x, quantized=True) -> LR and upscale(variables, lr) -> GRAIN.upscale's
  dict, run `chunk` images per device at a time (model.inference_chunk; util/chunks.py) over a
  batch split over `shards` devices."""
  def downscale(variables, x, quantized=True):
    return in_chunks(lambda x: model.apply(variables, x, quantized=quantized,
                                           method=model.downscale), chunk, shards)(x)

  def upscale(variables, lr):
    return in_chunks(lambda lr: model.apply(variables, lr, method=model.upscale),
                     chunk, shards)(lr)
  return downscale, upscale



class LoadedModel:
  """Converted GRAIN networks with jitted methods; all arrays are NHWC float32 in [-1, 1].

  `model` is the composed GRAIN Flax module (of the model networks present) and `variables`
  its variables; the other networks (discriminator, irse50, lpips) have a method each.
  Methods are available when the weights they need were converted (see NEEDS).
  """

  def __init__(self, tree: dict, model_cfg, meta: dict | None = None,
               compute_dtype: str | None = None, inference_chunk: int | None = None):
    # Run-time choices (the weights stay float32): compute dtype, images per pass.
    if compute_dtype is not None or inference_chunk is not None:
      model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
      if compute_dtype is not None:
        model_cfg.compute_dtype = compute_dtype
      if inference_chunk is not None:
        model_cfg.inference_chunk = int(inference_chunk)
    self.config = model_cfg
    self.networks = frozenset(tree)
    self.meta = meta or {}
    self.model = GRAIN.from_config(model_cfg, [n for n in tree if n in registry.MODEL_NETWORKS])
    self.hr_size = int(model_cfg.hr_size)
    self.lr_size = int(model_cfg.lr_size)
    put = lambda t: jax.tree_util.tree_map(jnp.asarray, t)
    self.variables = put(model_variables(tree))
    self._other = {n: put(v) for n, v in tree.items() if n not in registry.MODEL_NETWORKS}
    m = self.model
    down, up = rescale_functions(m, int(model_cfg.get("inference_chunk", 0)))
    self._downscale = jax.jit(down, static_argnums=2)
    self._upscale = jax.jit(up)
    self._generate = jax.jit(lambda v, w: m.apply(v, w, method=m.generate))
    self._apply = {n: jax.jit(registry.build(n, model_cfg).apply) for n in self._other}

  def require(self, method: str) -> None:
    """Raises RuntimeError naming the convert options if `method`'s weights are absent."""
    missing = [n for n in NEEDS[method] if n not in self.networks]
    if missing:
      raise RuntimeError(f"{method} needs weights that this checkpoint lacks: "
                         f"{registry.option_hint(missing)}; convert them with grain-jax convert")

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
    return self._apply["discriminator"](self._other["discriminator"],
                                        self._images(img, self.hr_size, "discriminate"))

  def identity(self, x112) -> jax.Array:
    """IR-SE50 embeddings (N, 512), L2-normalised, of aligned 112x112 crops."""
    self.require("identity")
    return self._apply["irse50"](self._other["irse50"], self._images(x112, 112, "identity"))

  def network_variables(self, name: str) -> dict:
    """The variables of one converted network that is not part of the GRAIN model (irse50,
    inception, lpips, discriminator)."""
    if name not in self._other:
      raise RuntimeError(f"this checkpoint has no {name} weights: "
                         f"{registry.option_hint([name])}; convert them with grain-jax convert")
    return self._other[name]

  @property
  def lpips_params(self):
    """The LPIPS variables of this checkpoint (needs --lpips at conversion)."""
    self.require("lpips")
    return self._other["lpips"]

  def lpips(self, a, b) -> jax.Array:
    """LPIPS (AlexNet) distance per image pair, shape (N,)."""
    self.require("lpips")
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
      raise ValueError(f"lpips: expected two NHWC batches of equal shape, got "
                       f"{tuple(a.shape)} and {tuple(b.shape)}")
    return self._apply["lpips"](self._other["lpips"], a, b)


def load(directory: str, compute_dtype: str | None = None,
         inference_chunk: int | None = None) -> LoadedModel:
  """Loads a converted-weights directory (grain-jax convert) or a training workdir (its
  latest weights, WORKDIR/weights; WORKDIR/best holds the best validated ones).

  compute_dtype: 'float32' (default) or 'bfloat16' (mixed precision: about twice as fast on
  GPUs and TPUs, within about 0.1 dB PSNR; see the README).
  inference_chunk: downscale/upscale run at most this many images at a time, whatever the
  batch (bounds the memory of large batches at 1024; the same outputs); 0 or None: the batch.
  """
  tree, cfg, meta = load_weights(weights_dir(directory))
  return LoadedModel(tree, cfg, meta, compute_dtype, inference_chunk)


def read_image(path: str, size: int) -> np.ndarray:
  """An image file as a batch of one for the methods above: (1, size, size, 3) float32 in
  [-1, 1], center-cropped to a square and resized (antialiased bicubic) if needed."""
  img, _ = images.read_image(path)
  return images.to_model(images.resize_square(img, size))[None]
