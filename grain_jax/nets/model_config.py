"""Model configs: GRAIN as published (1024 <-> 16) and a small one for CPUs and tests.

A model config is what `convert` stores with converted weights and what `grain_jax.load`
rebuilds the networks from; training configs hold one as their `model` field. Empty
`channels` / `decoder_blocks` mean "as the original for this hr_size / lr_size", so
`--config.model.hr_size=256` alone gives GRAIN's layout at 256 (rosinality's channel widths
for a 256 px StyleGAN2, one decoder level per resolution).
"""
import ml_collections


def grain_1024() -> ml_collections.ConfigDict:
  """The original GRAIN networks: 1024x1024 <-> 16x16 (64x per side)."""
  return ml_collections.ConfigDict(dict(
      hr_size=1024,
      lr_size=16,
      # How to run (not stored with converted weights): 'float32' or 'bfloat16' compute
      # (params stay float32), and rematerialisation of the heavy blocks in the backward pass.
      compute_dtype="float32",
      remat=False,
      # Training memory at full resolution: the stage's forward pass and the StyleGAN2
      # discriminator's convolutions run one image at a time and are recomputed in the backward
      # pass (train/step.one_example_at_a_time), which then holds one image's activations
      # instead of the batch's; ~1/3 more compute, the same results.
      remat_per_example=False,
      # Inference memory at large batches: downscale/upscale run this many images per device
      # at a time (a lax.map over chunks, util/chunks.py); 0 = the whole batch at once.
      inference_chunk=0,
      # How convolution weight gradients are computed (layers.CONV_WEIGHT_GRAD): 'xla',
      # 'matmul' (chunked im2col matmuls, faster on CPUs) or 'auto' (matmul where it pays on a
      # CPU, XLA's on GPU/TPU). Forward passes are the same in every mode.
      conv_weight_grad="auto",
      # Runs of same-shaped blocks (the rescaler's RRDBs) as one lax.scan each: the same
      # operations and parameters, but each run is compiled once (the TPU compiler's time grows
      # with the kernels it generates).
      scan_blocks=False,
      rescaler=dict(nf=64, gc=32, encoder_blocks=10,
                    # RRDBs per decoder level from lr_size up; () = the original's (3, 3, 3, 2, 1)
                    # fitted to the levels. The last `light` levels use one RRDB2 each.
                    decoder_blocks=(), decoder_light_levels=2),
      # n_codes: W+ codes Fea2Code emits, 0 = the generator's n_latent. The original always
      # emits 18 (9 blocks); a generator with fewer layers uses the first ones, as rosinality's.
      # head_channels: one stride-2 conv each; at least log2(lr_size) of them to reach 1x1
      # (more keep 1x1, as the original's 4 convs do at lr_size 4).
      fea2code=dict(head_channels=(64, 128, 256, 512), start_from_latent_avg=True, n_codes=0),
      # channels: one width per resolution 4..hr_size; () = rosinality's config-f widths.
      # conv_clamp: StyleGAN2-ADA's clipping of each conv's output (0: none, rosinality's);
      # set from the file when a .pkl is converted, as are the widths and the mapping depth.
      generator=dict(style_dim=512, n_mlp=8, channels=(), lr_mlp=0.01,
                     blur_kernel=(1, 3, 3, 1), modconv_impl="scale", conv_clamp=0.0),
      fusion=dict(branch_widths=((128, 128), (64, 64), (32, 32)), out_widths=(128, 128, 64, 64),
                  se_reduction=16),
      # Stages 2-4: rosinality's StyleGAN2 discriminator at hr_size.
      discriminator=dict(channels=(), stddev_group=4, conv_clamp=0.0),
      # Stage 1: SRGAN-style patch discriminator on bilinear-resized 256^2 images.
      patch_discriminator=dict(input_size=256, widths=(64, 128, 256, 512)),
  ))


def grain_small() -> ml_collections.ConfigDict:
  """A small GRAIN for CPUs and tests: 64x64 <-> 4x4 (16x per side), narrow networks."""
  c = grain_1024()
  c.hr_size, c.lr_size = 64, 4
  c.rescaler.update(nf=32, gc=16, encoder_blocks=2, decoder_blocks=(1, 1, 1))
  c.fea2code.head_channels = (64, 128)
  c.generator.update(style_dim=128, n_mlp=4, channels=(128, 128, 64, 32, 16))
  c.fusion.update(branch_widths=((32, 32), (16, 16), (8, 8)), out_widths=(32, 32, 16, 16))
  c.discriminator.channels = (128, 128, 64, 32, 16)
  c.patch_discriminator.update(input_size=64, widths=(16, 32, 64, 128))
  return c


MODELS = {"1024": grain_1024, "small": grain_small}

