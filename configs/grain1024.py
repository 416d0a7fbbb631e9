"""GRAIN's four stages in sequence at 1024 <-> 16, each with the original's recipe.

    grain-jax pipeline --config configs/grain1024.py --workdir WORKDIR \
        --config.data.train=FOLDER --config.init.weights=CONVERTED_WEIGHTS

The built-in config `grain1024` (grain_jax/configs/pipeline.py; docs/training.md says what a
pipeline config holds); edit this copy to keep your own settings.
"""
from grain_jax.train.config import pipeline_config


def get_config():
  c = pipeline_config()
  # c.data.train = "/data/celeba_hq/train"
  # c.data.eval = "/data/celeba_hq/test"
  # c.init.weights = "weights/grain1024"
  # c.batch_size = 8
  # c.pipeline.steps.finetune = 100000
  # c.pipeline.overrides.finetune.learning_rate = 2e-5
  return c
