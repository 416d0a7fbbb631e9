"""GRAIN stage 1: InvRRDB (encoder + decoder).

L2 + 0.1 LR-L2 + 0.8 LPIPS + 0.1 ID + 0.01 relativistic GAN (patch D every 6th step).

    python train.py --config configs/stage1_invrrdb.py --workdir WORKDIR \
        --config.data.train=FOLDER --config.init.weights=CONVERTED_WEIGHTS
"""
from configs.training import training_config


def get_config():
  return training_config("invrrdb")
