"""grain1024: the paper's four stages at 1024 <-> 16, each with the original's recipe.

    grain-jax pipeline --config grain1024 --workdir runs/grain1024 \\
        --config.data.train=/data/celeba_hq/train --config.init.weights=weights/grain1024

Stage k trains in WORKDIR/stage{k}_{name} from stage k-1's result (train/pipeline.py);
`--config.pipeline.steps.fusion=100000` sets one stage's steps, `--config.FIELD=VALUE` a
field of every stage. The StyleGAN2 generator and discriminator, IR-SE50 and (optionally)
LPIPS come from init.weights (grain-jax convert).
"""
from grain_jax.train.config import pipeline_config


def get_config():
  return pipeline_config()
