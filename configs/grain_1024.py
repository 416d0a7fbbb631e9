"""GRAIN as published: 1024x1024 <-> 16x16 (64x per side), the original's layer sizes.

`get_config()` returns {'model': ...}; the model part is what convert_weights.py records in a
converted checkpoint and what grain_jax.load rebuilds the networks from.
"""
import ml_collections

from grain_jax.stylegan2 import default_channels as rosinality_channels


def model_config(hr_size=1024, lr_size=16):
  """The original GRAIN networks (sizes other than 1024/16 keep the same widths)."""
  return ml_collections.ConfigDict(dict(
      hr_size=hr_size,
      lr_size=lr_size,
      # How to run (not stored with converted weights): 'float32' or 'bfloat16' compute
      # (params stay float32), and rematerialisation of the heavy blocks in the backward pass.
      compute_dtype="float32",
      remat=False,
      rescaler=dict(nf=64, gc=32, encoder_blocks=10,
                    # RRDBs per decoder level from lr_size up; the last `light` levels use one
                    # RRDB2 (4-conv dense block) each.
                    decoder_blocks=(3, 3, 3, 2, 1), decoder_light_levels=2),
      fea2code=dict(head_channels=(64, 128, 256, 512), start_from_latent_avg=True),
      generator=dict(style_dim=512, n_mlp=8, channels=rosinality_channels(hr_size), lr_mlp=0.01,
                     blur_kernel=(1, 3, 3, 1), modconv_impl="scale"),
      fusion=dict(branch_widths=((128, 128), (64, 64), (32, 32)), out_widths=(128, 128, 64, 64),
                  se_reduction=16),
      # Stages 2-4: rosinality's StyleGAN2 discriminator at hr_size.
      discriminator=dict(channels=rosinality_channels(hr_size), stddev_group=4),
      # Stage 1: SRGAN-style patch discriminator on bilinear-resized 256^2 images.
      patch_discriminator=dict(input_size=256, widths=(64, 128, 256, 512)),
  ))


def get_config():
  return ml_collections.ConfigDict(dict(model=model_config()))
