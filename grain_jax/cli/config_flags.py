"""`--config NAME|FILE` and `--config.FIELD=VALUE`: a config by name or file, with overrides.

The built-in configs are files of grain_jax/configs/, loaded by path as any config file is
(nothing here imports them):

    1024, small                            model configs ({'model': ...}; for convert and bench)
    invrrdb, fea2code, fusion, finetune    one training stage at 1024 (training.py)
    grain1024                              the four stages in sequence at 1024 (pipeline.py)
    demo                                   the quick start: the four stages at 64 <-> 4 (demo.py)

`--config` also takes the path of a config file (a module with `get_config()`), such as the
editable ones in the clone's configs/ folder.
"""
from __future__ import annotations

import os

import ml_collections
from absl import flags
from ml_collections import config_flags

from grain_jax.train import stages
from grain_jax.train.config import apply_stage_overrides, split_stage_overrides

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# name -> (file in FOLDER, argument of its get_config)
BUILTIN = {"1024": ("model.py", "1024"), "small": ("model.py", "small"),
           **{name: ("training.py", name) for name in stages.NAMES},
           "grain1024": ("pipeline.py", None), "demo": ("demo.py", None)}


def config_path(spec: str) -> str:
  """A config file for ml_collections' loader: `spec` itself if it names a file (optionally
  `FILE.py:ARG`), else the built-in config of that name. Raises ValueError otherwise."""
  if os.path.isfile(spec.split(":", 1)[0]):
    return spec
  if spec in BUILTIN:
    file, arg = BUILTIN[spec]
    return os.path.join(FOLDER, file) + (f":{arg}" if arg else "")
  raise ValueError(f"--config {spec}: neither a config file nor a built-in config "
                   f"({', '.join(BUILTIN)})")


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """The config `spec` names (see `config_path`) with command-line style overrides applied,
  e.g. ["--config.batch_size=8"]; ml_collections checks each field's type. A pipeline's
  --config.pipeline.overrides.STAGE.FIELD=VALUE may set any training field of one stage
  (train.config.apply_stage_overrides). Raises ValueError with one line naming the problem."""
  overrides, per_stage = split_stage_overrides(list(overrides))
  argv = ["grain-jax", f"--config={config_path(spec)}", *overrides]
  fv = flags.FlagValues()
  try:
    # sys_argv: the override flags are defined from the arguments they will parse.
    config_flags.DEFINE_config_file("config", None, "the config", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    rest = fv(argv)[1:]
  except flags.Error as e:
    raise ValueError(str(e).strip().splitlines()[0]) from None
  except (AttributeError, KeyError) as e:  # an override of a field the config lacks
    bad = [o.split("=")[0] for o in overrides if o.startswith("--config.")]
    raise ValueError(f"--config {spec} has no field {str(e).strip(chr(34))} (overrides: "
                     f"{', '.join(bad)}; --show_config lists the fields)") from None
  if rest:
    raise ValueError(f"unexpected arguments: {' '.join(rest)}")
  cfg = fv.config
  apply_stage_overrides(cfg, per_stage)
  return cfg
