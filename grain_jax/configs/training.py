"""The stages' configs `invrrdb`, `fea2code`, `fusion` and `finetune`: one GRAIN stage at 1024
with the original's recipe (grain_jax/train/config.py says what each field is)."""
import ml_collections

from grain_jax.train.config import training_config


def get_config(stage: str = "invrrdb") -> ml_collections.ConfigDict:
  """For a config file loader: `training.py:STAGE`."""
  return training_config(stage)
