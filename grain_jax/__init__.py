"""grain_jax: GRAIN (CVPR 2022, extreme image rescaling with a StyleGAN2 prior) in JAX/Flax.

    import grain_jax
    m = grain_jax.load("weights/grain1024")          # grain-jax convert's output
    x = grain_jax.read_image("face.png", m.hr_size)  # (1, 1024, 1024, 3) in [-1, 1]
    out = m.upscale(m.downscale(x))                  # hr, hr_inv, hr_gan, codes

The package's layers, each importing only from those before it: util, nets, formats, data,
inference (this API, and rescale.py for files), eval, train, configs, cli (docs/internals.md).
"""
from grain_jax.data.face_align import align  # dlib is imported only when a face is aligned
from grain_jax.inference import LoadedModel, load, read_image

__all__ = ["LoadedModel", "align", "load", "read_image"]
