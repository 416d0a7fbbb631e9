"""The network table (registry.py): every converter reports a file's problems the same way,
and every network builds from the model configs. One table of cases, one check each."""
import jax
import numpy as np
import pytest

from grain_jax.nets import lpips, registry
from grain_jax.nets.model_config import grain_1024, grain_small
from grain_jax.nets.torch_import import CheckpointError


def _config(hr_size=None):
  cfg = grain_1024()
  if hr_size:
    cfg.hr_size = hr_size  # the reference StyleGAN2 cases are 256 px
  return cfg


def _patch_discriminator_state_dict():
  from test_discriminators import _torch_patch_d, _torch_state
  return _torch_state(_torch_patch_d((64, 128, 256, 512), seed=4))


def _pt_inception_state_dict():
  from test_inception import pt_inception_state_dict
  return {k: v.numpy() for k, v in pt_inception_state_dict().items()}


# network -> (model config, how to get a valid state dict of that layout)
CASES = {
    "rescaler": (_config, lambda ckpt: registry.get("rescaler").read(ckpt("grain_invrrdb"))[0]),
    "fea2code": (_config, lambda ckpt: registry.get("fea2code").read(ckpt("grain_fea2code"))[0]),
    "generator": (lambda: _config(256),
                  lambda ckpt: registry.get("generator").read(ckpt("stylegan2_gen_256"))[0]),
    "fusion": (_config, lambda ckpt: registry.get("fusion").read(ckpt("grain_fusion"))[0]),
    "discriminator": (lambda: _config(256), lambda ckpt: registry.get("discriminator").read(
        ckpt("stylegan2_disc_256"))[0]),
    "patch_discriminator": (_config, lambda ckpt: _patch_discriminator_state_dict()),
    "irse50": (_config, lambda ckpt: registry.get("irse50").read(ckpt("irse50_112"))[0]),
    "lpips": (_config, lambda ckpt: lpips.builtin_state_dict()),
    "inception": (_config, lambda ckpt: _pt_inception_state_dict()),
}


def test_every_network_has_a_case_and_its_own_convert_option():
  assert set(CASES) == set(registry.NETWORKS)
  options = [n.option for n in registry.NETWORKS.values()]
  assert len(set(options)) == len(options)
  assert registry.option_hint(["rescaler", "generator"]) == (
      "rescaler (--invrrdb), generator (--stylegan2)")


@pytest.fixture(scope="module")
def valid(torch_ckpt):
  """name -> (config, a valid state dict); built once per network."""
  cache = {}

  def get(name):
    if name not in cache:
      make_cfg, make_sd = CASES[name]
      cache[name] = (make_cfg(), dict(make_sd(torch_ckpt)))
    return cache[name]
  return get


def _a_weight(sd, ndim):
  """The first learned tensor of at least `ndim` dimensions (not a FIR buffer)."""
  return next(k for k, v in sd.items()
              if np.ndim(v) >= ndim and k.endswith("weight") and "kernel" not in k)


@pytest.mark.parametrize("name", sorted(CASES))
def test_valid_file_converts_to_the_expected_tree(name, valid):
  cfg, sd = valid(name)
  variables = registry.from_state_dict(name, sd, cfg)
  expected = registry.expected_variables(name, cfg)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(expected)):
    assert np.shape(got) == want.shape


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong shape"])
def test_a_bad_file_is_reported_by_key(name, problem, valid):
  cfg, sd = valid(name)
  sd = dict(sd)
  if problem == "missing":
    key = _a_weight(sd, 1)
    del sd[key]
    match = rf"missing keys \(1\): {key}"
  elif problem == "unexpected":
    sd["bogus.weight"] = np.zeros(3, np.float32)
    match = r"unexpected keys \(1\): bogus\.weight"
  else:
    key = _a_weight(sd, 2)
    sd[key] = np.zeros((np.shape(sd[key])[0] + 1,) + np.shape(sd[key])[1:], np.float32)
    match = r"shape \(.*\) \(in Flax layout\), the configured model needs"
  with pytest.raises(CheckpointError, match=match) as e:
    registry.from_state_dict(name, sd, cfg, what=f"{name} (FILE)")
  assert str(e.value).startswith(f"{name} (FILE): ")


def test_every_problem_of_a_file_is_named_at_once(valid):
  cfg, sd = valid("fusion")
  sd = dict(sd)
  del sd["out.4.bias"]
  sd["conv1.0.weight"] = np.zeros((5, 5, 3, 3), np.float32)
  sd["extra.bias"] = np.zeros(2, np.float32)
  with pytest.raises(CheckpointError) as e:
    registry.from_state_dict("fusion", sd, cfg)
  msg = str(e.value)
  assert "out.4.bias" in msg and "extra.bias" in msg and "params/conv1_0/kernel: shape" in msg


@pytest.mark.parametrize("cfg", [grain_1024(), grain_small()], ids=["1024", "small"])
def test_every_network_builds_from_the_model_configs(cfg):
  for name in registry.NETWORKS:
    leaves = jax.tree_util.tree_leaves(registry.expected_variables(name, cfg))
    assert leaves and all(leaf.dtype == np.float32 for leaf in leaves), name
