"""grain_jax: GRAIN (CVPR 2022, extreme image rescaling with a StyleGAN2 prior) in JAX/Flax.

    import grain_jax
    m = grain_jax.load("weights/grain1024")          # grain-jax convert's output
    x = grain_jax.read_image("face.png", m.hr_size)  # (1, 1024, 1024, 3) in [-1, 1]
    out = m.upscale(m.downscale(x))                  # hr, hr_inv, hr_gan, codes
"""
from grain_jax.inference import LoadedModel, load, read_image
from grain_jax.face_align import align  # dlib is imported only when a face is aligned

__all__ = ["LoadedModel", "align", "load", "read_image"]
