"""GRAIN stage 2: Fea2Code only (InvRRDB frozen).

L2 + LPIPS + ID + non-saturating GAN on hr_gan (StyleGAN2 D every 5th step, lazy R1).

    grain-jax train --config configs/stage2_fea2code.py --workdir WORKDIR \
        --config.data.train=FOLDER --config.init.weights=CONVERTED_WEIGHTS \
        --config.init.previous_workdir=STAGE1_WORKDIR

The built-in config `fea2code`; edit this copy to keep your own settings (see stage1_invrrdb.py).
"""
from grain_jax.train.config import training_config


def get_config():
  return training_config("fea2code")
