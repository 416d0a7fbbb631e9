"""GRAIN stage 1: InvRRDB (encoder + decoder).

L2 + 0.1 LR-L2 + 0.8 LPIPS + 0.1 ID + 0.01 relativistic GAN (patch D every 6th step).

    grain-jax train --config configs/stage1_invrrdb.py --workdir WORKDIR \
        --config.data.train=FOLDER --config.init.weights=CONVERTED_WEIGHTS

The built-in config `invrrdb` (grain_jax/train/config.py: the original's recipe); edit this
copy to keep your own settings, e.g. your data folders, instead of passing them each time.
"""
from grain_jax.train.config import training_config


def get_config():
  c = training_config("invrrdb")
  # c.data.train = "/data/celeba_hq/train"
  # c.data.eval = "/data/celeba_hq/test"
  # c.init.weights = "weights/grain1024"
  return c
