"""grain_jax: GRAIN (CVPR 2022, extreme image rescaling with a StyleGAN2 prior) in JAX/Flax."""
from grain_jax.api import Grain, load

__all__ = ["Grain", "load"]
