"""StyleGAN2-ADA `.pkl` snapshots: G_ema and D converted by `grain-jax convert` against what
NVIDIA's stylegan2-ada-pytorch computed for the same file (tests/data/stylegan2_ada: README.md
there says how it was made), pickles that try to run code refused with nothing executed, and
files the StyleGAN2 of grain_jax cannot represent refused, saying what differs."""
import copy
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import DATA, ROOT, assert_close_rel, convert_cli, nchw, nhwc
from grain_jax.nets import ada_pickle, registry
from grain_jax.nets.torch_import import CheckpointError
from tiny_config import tiny_model

ADA = os.path.join(DATA, "stylegan2_ada")
PKL = os.path.join(ADA, "tiny.pkl")
TINY = os.path.join(ROOT, "tests", "tiny_config.py")
REL = 1e-4  # of the reference's RMS


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """tiny.pkl's G_ema and D converted as a user would, the tiny config otherwise (its
  StyleGAN2 fields set to other values here: the file's replace them)."""
  out = tmp_path_factory.mktemp("ada") / "w"
  r = convert_cli(out, "--stylegan2", PKL, "--discriminator", PKL, "--config", TINY,
                  "--config.model.generator.n_mlp=8", "--config.model.generator.lr_mlp=1.0",
                  "--config.model.generator.channels=(64,64,64,64)",
                  "--config.model.discriminator.stddev_group=2")
  assert r.returncode == 0, r.stderr
  return out


def test_generator_and_discriminator_match_stylegan2_ada(converted):
  import grain_jax
  ref = np.load(os.path.join(ADA, "reference.npz"))
  m = grain_jax.load(str(converted))
  # Widths, mapping depth and conv_clamp come from the file.
  g, d = m.config.generator, m.config.discriminator
  assert (tuple(g.channels), g.n_mlp, g.style_dim, g.lr_mlp, g.conv_clamp) == (
      (32, 32, 16, 8), 2, 32, 0.01, 1.0)
  assert (tuple(d.channels), d.stddev_group, d.conv_clamp) == ((32, 32, 16, 8), 4, 1.0)

  assert_close_rel(nchw(m.generate(ref["ws"])), ref["g_from_w"], REL, "G_ema.synthesis(ws)")
  images = nhwc(ref["images"])
  assert_close_rel(np.asarray(m.discriminate(images)), ref["d_of_4"], REL, "D, a group of 4")
  assert_close_rel(np.asarray(m.discriminate(images[:2])), ref["d_of_2"], REL, "D, 2 images")

  # From z with truncation 1 (the mapping network), and w_avg as the latent average.
  gen = registry.build("generator", m.config)
  variables = registry.convert("generator", PKL, m.config)[0]
  np.testing.assert_array_equal(variables["buffers"]["latent_avg"], ref["w_avg"])
  img = gen.apply(variables, [ref["z"]], noise="const")[0]
  assert_close_rel(nchw(img), ref["g_from_z"], REL, "G_ema(z)")

  # The file's conv_clamp binds here: without it the images differ.
  unclamped = registry.build("generator", m.config).clone(conv_clamp=0.0)
  off = nchw(unclamped.apply(variables, [ref["z"]], noise="const")[0])
  assert np.sqrt(np.mean((off - ref["g_from_z"]) ** 2)) > 0.05 * np.sqrt(
      np.mean(ref["g_from_z"] ** 2))


# ------------------------------------------------------------------------------ crafted pickles

@pytest.fixture
def persistence(monkeypatch):
  """`torch_utils.persistence._reconstruct_persistent_obj` under its real name (pickle writes
  a function by its module and name), doing what NVIDIA's does with the stored source: exec
  it. Returns a class whose instances pickle as that code's persistent objects."""
  pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

  def _reconstruct_persistent_obj(meta):
    namespace = {}
    exec(meta["module_src"], namespace)
    return namespace[meta["class_name"]]
  _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
  pkg.persistence = mod
  monkeypatch.setitem(sys.modules, "torch_utils", pkg)
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

  class Persistent:
    def __init__(self, class_name, state, module_src=""):
      self.meta = dict(type="class", version=4, module_src=module_src, class_name=class_name,
                       state=state)

    def __reduce__(self):
      return (_reconstruct_persistent_obj, (self.meta,))
  return Persistent


def _write(path, obj, protocol=None):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)
  return str(path)


def test_a_reduce_calling_os_system_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / "ran"

  class Shell:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))
  evil = _write(tmp_path / "evil.pkl", {"G_ema": Shell(), "D": None})
  r = convert_cli(tmp_path / "out", "--stylegan2", evil, "--config", TINY)
  assert r.returncode == 2 and len(_errors(r.stderr)) == 1, r.stderr
  assert f"{os.system.__module__}.system" in _errors(r.stderr)[0]
  assert "refused" in r.stderr and "Traceback" not in r.stderr
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_persistent_object_whose_source_writes_a_file_is_read_without_running_it(
    tmp_path, persistence):
  marker = tmp_path / "ran"
  src = f"open({str(marker)!r}, 'w').write('ran')\nclass Generator:\n  pass\n"
  evil = _write(tmp_path / "evil.pkl", {"G_ema": persistence("Generator", {}, src)})
  with open(evil, "rb") as f:  # the original's way of loading runs it ...
    pickle.load(f)
  assert marker.exists()
  marker.unlink()
  snap = ada_pickle.load_snapshot(evil)  # ... this one keeps the class name and state only
  assert isinstance(snap["G_ema"], ada_pickle.PersistentObject)
  assert snap["G_ema"].class_name == "Generator" and snap["G_ema"].state == {}
  assert not hasattr(snap["G_ema"], "module_src") and not hasattr(snap["G_ema"], "__dict__")
  with pytest.raises(CheckpointError, match="G_ema has no mapping network"):
    registry.config_for_sources(tiny_model(), {"generator": evil})
  assert not marker.exists()


def test_a_global_outside_the_list_is_refused_in_one_line(tmp_path):
  path = _write(tmp_path / "eval.pkl", {"G_ema": eval})
  with pytest.raises(ada_pickle.UnsafePickleError) as e:
    ada_pickle.load_snapshot(path)
  assert "builtins.eval" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_truncated_and_g_ema_less_pickles_get_one_line_each(tmp_path):
  data = open(PKL, "rb").read()
  cut = tmp_path / "cut.pkl"
  cut.write_bytes(data[:len(data) // 2])
  r = convert_cli(tmp_path / "o1", "--stylegan2", cut, "--config", TINY)
  assert r.returncode == 2 and len(_errors(r.stderr)) == 1, r.stderr
  assert "not a complete StyleGAN2-ADA pickle (truncated or corrupt?" in r.stderr

  no_g = _write(tmp_path / "d_only.pkl", {"D": None, "training_set_kwargs": {}})
  r = convert_cli(tmp_path / "o2", "--stylegan2", no_g, "--config", TINY)
  assert r.returncode == 2 and len(_errors(r.stderr)) == 1, r.stderr
  assert "no G_ema network in this pickle (it holds D, training_set_kwargs)" in r.stderr
  assert "Traceback" not in r.stderr


def _as_written(obj, persistence):
  """A snapshot read by ada_pickle back into what NVIDIA's code pickles (persistent objects,
  torch tensors), to write variants of tiny.pkl."""
  import torch
  if isinstance(obj, ada_pickle.PersistentObject):
    return persistence(obj.class_name, _as_written(obj.state, persistence))
  if isinstance(obj, np.ndarray):
    return torch.from_numpy(obj)
  if isinstance(obj, OrderedDict):
    return OrderedDict((k, _as_written(v, persistence)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _as_written(v, persistence) for k, v in obj.items()}
  return obj


def _variant(tmp_path, persistence, name, edit, protocol=None):
  snap = copy.deepcopy(ada_pickle.load_snapshot(PKL))
  edit(snap)
  return _write(tmp_path / f"{name}.pkl", _as_written(snap, persistence), protocol)


def _synthesis(snap):
  return snap["G_ema"].child("synthesis")


@pytest.mark.parametrize("name, edit, network, message", [
    ("conditional", lambda s: s["G_ema"].state.update(c_dim=2), "generator",
     "G_ema is conditional (c_dim=2)"),
    ("stylegan3", lambda s: _synthesis(s).state.update(_modules=OrderedDict(
        input=None, L0_36_512=None)), "generator",
     "G_ema is a StyleGAN3 (alias-free) generator, not a StyleGAN2"),
    ("resnet_g", lambda s: [b.state.update(architecture="resnet")
                            for b in _synthesis(s).children().values()], "generator",
     "G_ema's synthesis architecture is 'resnet', not 'skip'"),
    ("skip_d", lambda s: [b.state.update(architecture="skip")
                          for b in s["D"].children().values()], "discriminator",
     "D's architecture is 'skip', not 'resnet'"),
])
def test_what_the_generator_cannot_represent_is_named(tmp_path, persistence, name, edit,
                                                      network, message):
  path = _variant(tmp_path, persistence, name, edit)
  with pytest.raises(CheckpointError) as e:
    registry.config_for_sources(tiny_model(), {network: path})
  assert message in str(e.value) and "cannot represent it exactly" in str(e.value)


def test_the_round_trip_of_a_variant_writer_keeps_the_file_convertible(tmp_path, persistence):
  """The variants above differ from tiny.pkl by their edit only: unedited, the writer's copy
  converts to the same variables. Written with pickle protocol 3, as the Python 3.7 of
  stylegan2-ada-pytorch's time did (sets as builtins.set calls, not protocol 4's opcode)."""
  same = _variant(tmp_path, persistence, "same", lambda s: None, protocol=3)
  assert b"builtins\nset" in open(same, "rb").read()
  cfg = registry.config_for_sources(tiny_model(), {"generator": PKL, "discriminator": PKL})
  for net in ("generator", "discriminator"):
    a, b = (registry.convert(net, p, cfg)[0] for p in (PKL, same))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)


def test_a_network_missing_a_tensor_is_named(tmp_path, persistence):
  path = _variant(tmp_path, persistence, "no_weight", lambda s: s["G_ema"].child(
      "mapping").child("fc1").state["_parameters"].pop("weight"))
  with pytest.raises(CheckpointError, match=r"G_ema is not laid out as StyleGAN2-ADA's "
                                            r"\(KeyError: 'weight'\)"):
    registry.convert("generator", path, tiny_model())


def test_a_pickle_of_another_resolution_names_the_override():
  cfg = tiny_model()
  cfg.hr_size = 64
  with pytest.raises(CheckpointError, match=r"a 32px StyleGAN2, but the model config is for "
                                            r"64px \(set --config.model.hr_size=32"):
    registry.config_for_sources(cfg, {"generator": PKL})


# ------------------------------------------------------------------------------ a user's route

def test_training_from_the_ada_prior_then_up(converted, tmp_path, capsys):
  """`grain-jax train --config.init.weights=W` (W: tiny.pkl converted) trains stage 2 with the
  pickle's StyleGAN2 (frozen there), and `grain-jax up` upscales with the result. (One step,
  without the adversarial term: the discriminator's programs are the suite's slowest part
  here, and its conversion is checked above.)"""
  pictures = tmp_path / "pictures"
  pictures.mkdir()
  for name in ("astronaut", "coffee"):  # training data
    img = Image.fromarray(getattr(skimage.data, name)())
    img.resize((img.width // 6, img.height // 6), Image.BICUBIC).save(pictures / f"{name}.png")

  def grain_jax(*args):  # in this process, as a user runs the command
    from grain_jax import cli
    rc = cli.main([*map(str, args)])
    return subprocess.CompletedProcess(args, rc, "", capsys.readouterr().err)
  train = ["train", "--config", f"{TINY}:fea2code", "--workdir", tmp_path / "run",
           "--noprogress", f"--config.data.train={pictures}", f"--config.init.weights={converted}",
           "--config.max_steps=1", "--config.checkpoint_every=1", "--config.loss.adv=0"]
  r = grain_jax(*train)  # the file's conv_clamp is not the tiny config's: named
  assert r.returncode == 2 and len(_errors(r.stderr)) == 1, r.stderr
  assert ("the StyleGAN2 was converted with another conv_clamp (a StyleGAN2-ADA file's) than "
          "the config's; run with --config.model.generator.conv_clamp=1 "
          "--config.model.discriminator.conv_clamp=1") in r.stderr
  r = grain_jax(*train, "--config.model.generator.conv_clamp=1",
                "--config.model.discriminator.conv_clamp=1")
  assert r.returncode == 0, r.stderr

  import grain_jax as gj
  from flax import traverse_util
  prior = traverse_util.flatten_dict(gj.load(str(converted)).variables, sep="/")
  trained = traverse_util.flatten_dict(gj.load(str(tmp_path / "run")).variables, sep="/")
  synthesis = [k for k in prior if "generator" in k and "style_" not in k]
  assert synthesis
  for k in synthesis:  # stage 2 trains Fea2Code only: the prior's StyleGAN2 as it came
    np.testing.assert_array_equal(trained[k], prior[k], err_msg=k)

  lr = tmp_path / "lr.png"  # an 8-bit LR picture, as grain-jax down writes them
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), np.uint8)).save(lr)
  r = grain_jax("up", "--checkpoint", tmp_path / "run", lr, "--out", tmp_path / "hr",
                "--save", "hr,hr_gan")
  assert r.returncode == 0, r.stderr
  for suffix in ("", "_hr_gan"):
    assert Image.open(tmp_path / "hr" / f"lr{suffix}.png").size == (32, 32)


def test_tensor_rebuilds_read_views_and_refuse_one_past_the_storage():
  """The allowed tensor rebuilds: v2 (torch's pickles of a tensor: a typed storage) and v3
  (an untyped storage and a dtype) give the view's values; a view past the end fails."""
  import warnings
  import torch
  values = torch.arange(6, dtype=torch.float32)
  with warnings.catch_warnings():  # TypedStorage is deprecated, but what old pickles hold
    warnings.simplefilter("ignore", UserWarning)
    typed = values.storage()
  np.testing.assert_array_equal(ada_pickle.ALLOWED[("torch._utils", "_rebuild_tensor_v2")](
      typed, 0, (3,), (2,), False, None), [0, 2, 4])
  v3 = ada_pickle.ALLOWED[("torch._utils", "_rebuild_tensor_v3")]
  np.testing.assert_array_equal(v3(values.untyped_storage(), 1, (2, 2), (2, 1), False, None,
                                   torch.float32), [[1, 2], [3, 4]])
  with pytest.raises(RuntimeError):
    v3(values.untyped_storage(), 0, (100,), (1,), False, None, torch.float32)
  with pytest.raises(ada_pickle.UnsafePickleError):
    v3(b"not a storage", 0, (1,), (1,), False, None, torch.float32)
