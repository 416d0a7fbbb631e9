"""Training parity: grain_jax's training step against GRAIN's own training loop.

tests/data/grain_training holds what the original `coaches/coachTrain.py` computed for K
consecutive steps of each stage (README.md there: how, and every change made to run it): the
losses of every step and, after step K, the parameters of the trained networks and the
discriminator. Here the same initial weights go through `grain-jax convert`, the same batches
and random draws through the program the training loop runs (train.step.create_training), and
each loss term and parameter is compared with the original's.

The model is GRAIN's 1024 layout (the published networks' parameter shapes) at 256 px: 64x to
a 4x4 LR image, Fea2Code's 18 codes, and a StyleGAN2 G and D at 256 px whose last three
widths are those of the 1024 generator's (what the 1024 Fusion reads).
"""
import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh

from conftest import DATA, convert_cli
from grain_jax.nets import registry
from grain_jax.nets.model_config import grain_1024
from grain_jax.train import initial_weights, optim
from grain_jax.train.config import training_config
from grain_jax.train.step import AXIS, create_training

sys.path.insert(0, os.path.join(DATA, "grain_training"))
import recipe  # noqa: E402

REFS = os.path.join(DATA, "grain_training")
NARROW = (512, 512, 512, 512, 128, 64, 32)  # widths at 4..256 px
# Initial weights: the tests/data folder of each network (what make_reference.py loaded).
FOLDERS = {"rescaler": ("grain_invrrdb", "invrrdb"), "fea2code": ("grain_fea2code", "codestylegan"),
           "fusion": ("grain_fusion", "fusion"),
           "generator": ("stylegan2_gen_256_narrow", "stylegan2"),
           "discriminator": ("stylegan2_disc_256_narrow", "discriminator"),
           "patch_discriminator": ("grain_patch_disc", "patch_discriminator"),
           "irse50": ("irse50_112", "irse50")}
# The original's loss_dict keys -> grain_jax's metric names.
LOSSES = {"loss_hr_l2": "loss_l2", "loss_lr_l2": "loss_lr_l2", "loss_lpips": "loss_lpips",
          "loss_id": "loss_id", "adv_loss": "loss_adv", "loss": "loss"}
# Tolerances, relative (see README.md there: the original against itself in float64 and with
# another thread count stays well inside them).
LOSS_REL = 1e-4
PARAM_REL = 1e-4


def parity_model():
  """GRAIN's 1024 layout at 256 px (the reference runs' model)."""
  c = grain_1024()
  c.hr_size, c.lr_size = 256, 4
  c.fea2code.n_codes = 18
  c.generator.channels = NARROW
  c.discriminator.channels = NARROW
  return c


@pytest.fixture(scope="module")
def parity_weights(torch_ckpt, tmp_path_factory):
  """The reference runs' initial weights, converted as a user would."""
  out = tmp_path_factory.mktemp("parity") / "weights"
  args = [a for net, (case, option) in FOLDERS.items()
          for a in (f"--{option}", torch_ckpt(case))]
  m = parity_model()
  r = convert_cli(out, *args, "--lpips", "builtin", "--config", "1024",
                  f"--config.model.hr_size={m.hr_size}", f"--config.model.lr_size={m.lr_size}",
                  "--config.model.fea2code.n_codes=18",
                  f"--config.model.generator.channels={NARROW}",
                  f"--config.model.discriminator.channels={NARROW}")
  assert r.returncode == 0, r.stderr
  return str(out)


def _nhwc(a):
  return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


def step_batch(stage: str, step: int, ref: dict) -> dict:
  """The step's batch and the original's random draws of its forward passes."""
  n, size, lr = ref["batch_size"], ref["size"], ref["lr_size"]
  x, y = recipe.batch(step, n, size)
  n_layers = 0 if stage == "invrrdb" else 2 * int(np.log2(size)) - 3

  def draws(p):
    if p is None:  # no discriminator step: unused, zeros of the same structure
      return (np.zeros((n, lr, lr, 3), np.float32),
              [np.zeros((n, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), 1), np.float32)
               for i in range(n_layers)])
    q = recipe.noise_array(stage, step, p, 0, (n, 3, lr, lr))
    g = [recipe.noise_array(stage, step, p, 1 + i, (n, 1, 2 ** ((i + 5) // 2),
                                                    2 ** ((i + 5) // 2)))
         for i in range(n_layers)]
    return _nhwc(q), [_nhwc(a) for a in g]

  passes = recipe.passes(stage, step)
  return {"x": x, "y": y, "noise": {k: draws(p) for k, p in passes.items()}}


def _reference(stage: str) -> tuple[dict, dict]:
  name = f"{stage}_256_float32_t2"
  with open(os.path.join(REFS, f"{name}.json")) as f:
    ref = json.load(f)
  return ref, dict(np.load(os.path.join(REFS, f"{name}.npz")))


@pytest.fixture(scope="module")
def training_of(parity_weights):
  """stage -> (config, Training, loss variables) from the converted weights, its programs
  compiled ahead side by side (XLA compiles a program on one core). Built when a test asks,
  so that one stage's state and programs are in memory at a time (four at once took ~17 GB)."""
  mesh = Mesh(np.array(jax.devices()[:1]), (AXIS,))

  def build(stage):
    cfg = training_config(stage, parity_model())
    cfg.init.weights = parity_weights
    cfg.batch_size = 1
    variables, d_variables, loss_vars, _ = initial_weights.initial_variables(cfg)
    training = create_training(cfg, variables, d_variables, loss_vars, mesh)
    batch = step_batch(stage, 0, _reference(stage)[0])  # step 0 runs every program
    training.step.compile(training.state, batch, loss_vars)
    return cfg, training, loss_vars
  return build


def run_grain_jax(stage: str, training, loss_vars, ref: dict):
  """K steps of the training loop's step: (per-step metrics, final state)."""
  state, metrics = training.state, []
  for k in range(ref["steps"]):
    state, m = training.step(state, step_batch(stage, k, ref), loss_vars)
    metrics.append(jax.device_get(m))
  return metrics, state


def loss_errors(ref: dict, metrics: list) -> dict:
  """{term: worst |got - want| / |want| over the steps} of every loss, d_loss and r1."""
  worst = {}
  for want, got in zip(ref["per_step"], metrics):
    assert int(got["nonfinite"]) == 0
    pairs = [(LOSSES[k], v) for k, v in want["losses"].items() if k in LOSSES]
    pairs += [(k, want[k]) for k in ("d_loss", "r1") if k in want]
    for name, v in pairs:
      err = abs(float(got[name]) - v) / abs(v)
      worst[name] = max(worst.get(name, 0.0), err)
  return worst


def _converted(name: str, model_cfg, state_dict: dict) -> dict:
  params = registry.from_state_dict(name, state_dict, model_cfg)["params"]
  return traverse_util.flatten_dict(params, sep="/")


def param_errors(name: str, model_cfg, state_dict0: dict, trained: dict, ref: dict,
                 full: dict) -> dict:
  """Worst relative errors of one network's parameters after K steps:
  full tensors (max |got - want| / RMS(want)), and for every tensor the RMS of its change and
  its change's projection on a fixed direction (each error / RMS of the tensor).

  The original's tensors are mapped onto grain_jax's through the network's converter: each
  tensor set to a distinct constant shows where it lands, a probe direction or stored values
  put in its place arrive in grain_jax's layout."""
  # Every tensor the original's optimizer held (StyleGAN2's FIR kernels are buffers).
  summary = {k.split("/", 1)[1]: v for k, v in ref["params"].items()
             if k.startswith(name + "/") and not k.endswith(".kernel")}
  keys = sorted(summary)
  tags = _converted(name, model_cfg, {**state_dict0, **{
      k: np.full(np.shape(state_dict0[k]), i + 1, np.float32) for i, k in enumerate(keys)}})
  where = {}
  for leaf, v in tags.items():
    v = np.asarray(v)
    tag = v.flat[0]  # one tensor's constant throughout (np.unique would sort 73M values)
    assert np.all(v == tag) and tag == int(tag), f"{name}/{leaf}: not one tensor's"
    where[keys[int(tag) - 1]] = leaf
  assert sorted(where) == keys, f"{name}: tensors without a grain_jax parameter"
  p0 = _converted(name, model_cfg, state_dict0)
  probes = _converted(name, model_cfg, {**state_dict0, **{
      k: recipe.probe(np.shape(state_dict0[k]), summary[k]["index"]) for k in keys}})
  wanted = _converted(name, model_cfg, {**state_dict0, **{
      k.split("/", 1)[1]: v for k, v in full.items() if k.startswith(name + "/")}})
  got = traverse_util.flatten_dict(jax.device_get(trained), sep="/")
  worst = {"full": 0.0, "delta_rms": 0.0, "delta_probe": 0.0}
  for k in keys:
    leaf, s = where[k], summary[k]
    g = np.asarray(got[leaf], np.float64)
    d = g - np.asarray(p0[leaf], np.float64)
    r = np.asarray(probes[leaf], np.float64)
    worst["delta_rms"] = max(worst["delta_rms"], abs(np.sqrt(np.mean(d ** 2))
                                                     - s["delta_rms"]) / s["rms"])
    proj = np.sum(d * r) / np.sqrt(np.sum(r ** 2) * r.size)
    worst["delta_probe"] = max(worst["delta_probe"], abs(proj - s["delta_probe"]) / s["rms"])
    if f"{name}/{k}" in full:
      w = np.asarray(wanted[leaf], np.float64)
      worst["full"] = max(worst["full"], np.max(np.abs(g - w)) / np.sqrt(np.mean(w ** 2)))
  return worst


@pytest.mark.parametrize("stage", recipe.STAGES)
def test_training_steps_match_the_original(stage, training_of, torch_ckpt):
  ref, full = _reference(stage)
  cfg, training, loss_vars = training_of(stage)
  metrics, state = run_grain_jax(stage, training, loss_vars, ref)

  losses = loss_errors(ref, metrics)
  nets = {n: p for n, p in optim.model_params(state.params).items()}
  d_name = "patch_discriminator" if stage == "invrrdb" else "discriminator"
  nets[d_name] = optim.model_params(state.d_params)
  params = {}
  for n, p in nets.items():
    sd0, _ = registry.get(n).read(torch_ckpt(FOLDERS[n][0]))
    params[n] = param_errors(n, cfg.model, sd0, p, ref, full)
  if os.environ.get("GRAIN_PRINT_PARITY"):
    print(f"PARITY {stage}: losses {losses}; params {params}")
  bad = {k: v for k, v in losses.items() if v > LOSS_REL}
  assert not bad, f"{stage}: loss terms off the original's (worst relative error): {bad}"
  bad = {f"{n}.{k}": v for n, e in params.items() for k, v in e.items() if v > PARAM_REL}
  assert not bad, f"{stage}: parameters after {ref['steps']} steps off the original's: {bad}"
