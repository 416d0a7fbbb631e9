"""demo, the quick start: all four GRAIN stages at 64 px -> 4 px (16x per side) in a few
minutes on a CPU (what it runs: grain_jax/train/quickstart.py).

    grain-jax train --config demo --workdir demo_run

Data: natural images bundled with scikit-image; random crops of some make the training
set, fixed crops of others the held-out set. The StyleGAN2 prior is freshly initialised
(small, untrained) unless --config.init.weights names a converted 64 px checkpoint. Ends by
evaluating on the held-out crops: WORKDIR/metrics.json (grain-jax evaluate's keys) and
WORKDIR/comparison.png.
"""
from grain_jax.nets.model_config import grain_small
from grain_jax.train.config import pipeline_config


def get_config():
  c = pipeline_config(model=grain_small())
  # What `grain-jax train` (or `pipeline`) does with this config besides the stages: the data
  # it makes from scikit-image's pictures, and the final evaluation (train/quickstart.py).
  c.demo = dict(
      train_images=("astronaut", "coffee", "rocket", "hubble_deep_field",
                    "immunohistochemistry", "retina", "colorwheel", "brick", "grass", "gravel",
                    "moon", "horse", "text", "page"),
      heldout_images=("chelsea", "camera", "coins", "clock"),
      heldout_scale=0.35)
  p = c.pipeline
  # A time budget: the whole demo (data, four stages, evaluation) takes about this long on
  # any machine; each stage trains for as many steps as fit in its share of what is left
  # (the steps are printed and recorded in metrics.json). 0: the fixed pipeline.steps below.
  p.budget_s = 480.0
  p.budget_reserve_s = 30.0  # kept for the final evaluation and comparison.png
  # Stages 2 and 4 compile for longer than such a share lasts and run their probe steps
  # only: an untrained prior gives them little to learn. Fusion's share lets it learn to
  # pass the decoder's image on (hr ~ hr_inv, not below it).
  p.budget_share = dict(invrrdb=0.72, fea2code=0.02, fusion=0.14, finetune=0.12)
  c.max_steps = 100000  # a stage's cap under the budget
  p.steps = dict(invrrdb=520, fea2code=30, fusion=60, finetune=30)
  # Fine-tuning starts from converged networks and, under the budget, runs a few to ~100
  # steps: Adam's first steps move every weight by about the learning rate whatever the
  # gradient, so a low rate keeps them from undoing stages 1-3.
  for stage, lr in dict(invrrdb=1e-3, fea2code=1e-3, fusion=5e-4, finetune=1e-5).items():
    p.overrides[stage] = dict(learning_rate=lr)
  # PSNR-oriented demo: the L2 terms only (LR-L2 as each stage has it). LPIPS, identity and
  # the adversarial terms are off: an untrained prior and a few minutes of training give them
  # nothing to work with, each costs compilation time, and the GAN terms lower PSNR. (The
  # tests train with them.) Evaluation still reports LPIPS.
  c.loss.update({k: 0.0 for k in c.loss if k not in ("l2", "lr_l2")})
  c.init.random_init = ("rescaler", "fea2code", "fusion", "generator", "discriminator",
                        "patch_discriminator")
  c.init.random_all = True  # one initialisation (one compilation) for all four networks
  # The rescaler starts as a box-down / nearest-up resampler and Fusion as a pass-through of
  # the decoder's image (init.resample_start) rather than from noise: from PyTorch's default
  # init alone, 10 CPU minutes leave the rescaler ~1-2 dB below bicubic and Fusion far below.
  c.init.resample_start = True
  c.data.crop = "random"
  c.data.random_scale = (0.2, 0.5)
  c.data.hflip = True
  c.data.workers = 2
  c.data.eval_max_images = 64
  c.optimizer.name = "adam"  # converges faster than Ranger in a few hundred steps
  # A short warmup keeps Adam's first, sign-sized steps from wrecking the resampler start;
  # the cosine decay then settles each stage.
  c.lr_schedule = "cosine"
  c.warmup_steps = 10
  c.batch_size = 4
  c.log_every = 50
  c.image_every = 0
  c.eval_every = 0          # no per-stage validation: the demo evaluates once, at its end
  # One checkpoint, at the end of each stage: a save and export costs seconds, which the
  # time budget would otherwise lose to them (an interrupted demo reruns its stage).
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  return c
