"""A small GRAIN for CPUs and tests: 64x64 <-> 4x4 (16x per side), narrow networks.

Same architecture as configs/grain_1024.py with fewer levels, blocks and channels.
"""
import ml_collections


def model_config():
  return ml_collections.ConfigDict(dict(
      hr_size=64,
      lr_size=4,
      compute_dtype="float32",  # or 'bfloat16' (see configs/grain_1024.py)
      remat=False,
      rescaler=dict(nf=32, gc=16, encoder_blocks=2, decoder_blocks=(1, 1, 1),
                    decoder_light_levels=2),
      fea2code=dict(head_channels=(64, 128), start_from_latent_avg=True),
      generator=dict(style_dim=128, n_mlp=4, channels=(128, 128, 64, 32, 16), lr_mlp=0.01,
                     blur_kernel=(1, 3, 3, 1), modconv_impl="scale"),
      fusion=dict(branch_widths=((32, 32), (16, 16), (8, 8)), out_widths=(32, 32, 16, 16),
                  se_reduction=16),
      discriminator=dict(channels=(128, 128, 64, 32, 16), stddev_group=4),
      patch_discriminator=dict(input_size=64, widths=(16, 32, 64, 128)),
  ))


def get_config():
  return ml_collections.ConfigDict(dict(model=model_config()))
