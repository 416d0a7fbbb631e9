"""A tiny GRAIN (32 px <-> 4 px, narrow) and a training config for the training tests.

Also a config file for the train command: `--config tests/tiny_config.py` (stage 1).
"""
import ml_collections

from grain_jax.train.config import pipeline_config, training_config


def tiny_model():
  return ml_collections.ConfigDict(dict(
      hr_size=32, lr_size=4,
      rescaler=dict(nf=8, gc=8, encoder_blocks=1, decoder_blocks=(1, 1), decoder_light_levels=2),
      fea2code=dict(head_channels=(16, 32), start_from_latent_avg=True),
      generator=dict(style_dim=32, n_mlp=2, channels=(32, 32, 16, 8), lr_mlp=0.01,
                     blur_kernel=(1, 3, 3, 1), modconv_impl="scale", conv_clamp=0.0),
      fusion=dict(branch_widths=((8, 8), (8, 8), (8, 8)), out_widths=(8, 8, 8, 8),
                  se_reduction=4),
      discriminator=dict(channels=(32, 32, 16, 8), stddev_group=4, conv_clamp=0.0),
      patch_discriminator=dict(input_size=32, widths=(8, 16)),
  ))


def _tiny_run(c, overrides):
  """The tiny training fields, then `overrides` ({'a.b': value})."""
  c.init.random_all = True
  c.init.random_init = ("rescaler", "fea2code", "fusion", "generator", "discriminator",
                        "patch_discriminator")
  c.batch_size = 2
  c.max_steps = 4
  c.log_every = 1
  c.image_every = 0
  c.eval_every = 0
  c.checkpoint_every = 2
  c.d_every = 2
  c.r1_every = 2
  c.loss.id = 0.0
  c.loss.lpips = 0.0
  c.data.workers = 1
  c.learning_rate = 1e-3
  for k, v in overrides.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return c


def tiny_training(stage="invrrdb", **overrides):
  return _tiny_run(training_config(stage, model=tiny_model()), overrides)


def tiny_pipeline(**overrides):
  """The four stages at the tiny size, 2 steps each (learning rate and D interval shared)."""
  c = pipeline_config(model=tiny_model())
  c.pipeline.steps = {s: 2 for s in c.pipeline.stages}
  return _tiny_run(c, overrides)


def get_config(stage="invrrdb"):
  """`--config tests/tiny_config.py` (stage 1), `tests/tiny_config.py:finetune` etc., or
  `tests/tiny_config.py:pipeline` (the four stages)."""
  return tiny_pipeline() if stage == "pipeline" else tiny_training(stage)
