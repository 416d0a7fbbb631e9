"""GRAIN stage 3: Fusion only: the same losses on the final image (D every 3rd step).

    grain-jax train --config configs/stage3_fusion.py --workdir WORKDIR \
        --config.data.train=FOLDER --config.init.weights=CONVERTED_WEIGHTS \
        --config.init.previous_workdir=STAGE2_WORKDIR

The built-in config `fusion`; edit this copy to keep your own settings (see stage1_invrrdb.py).
"""
from grain_jax.train.config import training_config


def get_config():
  return training_config("fusion")
