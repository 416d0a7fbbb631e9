"""Training configs: one GRAIN stage with the original's 1024 hyper-parameters.

`training_config(stage)` is the built-in config of each stage (`--config invrrdb`, ...); the
files in the clone's configs/ build on it. Every field can be overridden on the command line,
e.g. `--config.batch_size=8`; `grain-jax train --config NAME --show_config` lists them.
"""
import ml_collections

from grain_jax import losses, stages
from grain_jax.configs import model as model_configs


def training_config(stage: str, model=None) -> ml_collections.ConfigDict:
  """The config of one stage (stages.STAGES gives its recipe); `model` defaults to 1024."""
  s = stages.get(stage)
  c = ml_collections.ConfigDict()
  c.model = model if model is not None else model_configs.grain_1024()
  c.stage = stage
  # Where the starting weights come from. `weights`: a converted weights directory
  # (grain-jax convert) with the StyleGAN2 G (stages 2-4), its D, IR-SE50 and LPIPS, and any
  # GRAIN networks; `previous_workdir`: the previous stage's workdir, whose trained networks
  # are taken from its latest weights (they override `weights`). Networks in `random_init`
  # may start from random weights when neither source has them.
  c.init = ml_collections.ConfigDict(dict(
      weights="", previous_workdir="",
      random_init=("rescaler", "fea2code", "fusion", "discriminator", "patch_discriminator"),
      random_all=False,
      # Randomly initialised rescaler and Fusion start as resamplers (box down, nearest up,
      # Fusion passing the decoder's image through; see resample_start.py) instead of from
      # PyTorch's default init alone. For short runs from scratch, such as the demo.
      resample_start=False))
  c.data = ml_collections.ConfigDict(dict(
      train="",            # folder of images (or source folder) or tfds:NAME/SPLIT
      train_target="",     # optional folder of targets with the same file names (paired data)
      eval="",             # held-out folder or tfds:NAME/SPLIT for validation ('' = none)
      data_dir="",         # TFDS data_dir
      crop="center",       # 'center': center square resized to hr; 'random': random crops
      random_scale=(1.0, 1.0),  # 'random': resize by a factor in this range, then crop
      hflip=False,
      workers=4,
      eval_max_images=50,  # the original validates on the first 50 test images
      eval_identity=True,  # identity similarity in validation (when IR-SE50 weights are loaded)
      eval_fid=False,      # FID/KID in validation (InceptionV3 on every output: slower)
      eval_inception="",   # pytorch-fid's .pth or a weights folder ('' = init.weights')
      eval_fid_dims=2048,  # Inception features for FID/KID (pytorch-fid's --dims)
  ))
  c.batch_size = 0          # global batch; 0 = one image per device (the original: 1 per GPU)
  c.learning_rate = s.learning_rate
  c.lr_schedule = "constant"  # or 'cosine' (to 0 at max_steps), both after warmup_steps
  c.warmup_steps = 0
  # b1 ... slow_step_size are Ranger's; name 'adam' is torch.optim.Adam with its defaults
  # (0.9, 0.999, 1e-8), as the original's --optim_name adam, and ignores them.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="ranger", b1=0.95, b2=0.999, eps=1e-5, sync_period=6, slow_step_size=0.5))
  c.d_learning_rate = -1.0  # < 0: same as learning_rate (the original)
  # The weight of each generator loss term (losses.LOSSES: what each is; 0 = off). GRAIN's
  # are l2, lr_l2, lpips, id and adv; ssim is off.
  c.loss = ml_collections.ConfigDict(losses.default_weights(s))
  c.d_every = s.d_every     # discriminator update every N steps (0: never)
  c.r1_gamma = 10.0
  c.r1_every = 16
  c.max_steps = 300000
  # > 0: train for about this many seconds (setup and compilation included): the step count,
  # and the cosine schedule's length, are set from the step time measured over the first
  # budget_probe_steps steps after the compiling one; max_steps is then a cap.
  c.time_budget_s = 0.0
  c.budget_probe_steps = 5
  c.log_every = 5000       # the original's board_interval
  c.image_every = 5000
  c.eval_every = 20000
  c.checkpoint_every = 20000
  c.keep_checkpoints = 3
  # A step whose loss or updated weights are not finite is skipped (nothing changes); after
  # this many in a row the run stops with exit status 2 (0: never stop, keep skipping).
  c.max_nonfinite_steps = 20
  # Stopping early with a checkpoint of the current step (exit status 75; the same command
  # resumes): on SIGTERM, SIGINT, `stop_signal` (e.g. 'SIGUSR1' for SLURM's --signal) and
  # once `time_limit_s` seconds (> 0) have passed since the start. A multi-process job
  # compares its processes' requests every `stop_check_every` steps (a collective).
  c.time_limit_s = 0.0
  c.stop_signal = ""
  c.stop_check_every = 10
  c.seed = 0
  return c


def get_config(stage: str = "invrrdb") -> ml_collections.ConfigDict:
  """For a config file loader: `training.py:STAGE`."""
  return training_config(stage)
