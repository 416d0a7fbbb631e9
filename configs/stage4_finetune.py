"""GRAIN stage 4: InvRRDB + Fea2Code + Fusion together at lr 5e-5, with the LR term (0.1).

    grain-jax train --config configs/stage4_finetune.py --workdir WORKDIR \
        --config.data.train=FOLDER --config.init.weights=CONVERTED_WEIGHTS \
        --config.init.previous_workdir=STAGE3_WORKDIR

The built-in config `finetune`; edit this copy to keep your own settings (see stage1_invrrdb.py).
"""
from grain_jax.train.config import training_config


def get_config():
  return training_config("finetune")
