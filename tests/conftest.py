"""Shared fixtures: PyTorch checkpoints rebuilt from the reference recipes in tests/data."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from grain_jax.util import tpu

# With libtpu installed (the tpu extra) and no TPU here, JAX's TPU backend would print
# warnings in every test process as it fails to start; the processes the tests start inherit.
tpu.quiet_libtpu_off_tpu()

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_cli(out, *args):
  """Runs `python -m grain_jax convert` as a user would; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", "grain_jax", "convert", "--out", str(out),
                         *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def import_torchvision():
  """Imports torchvision (for pytorch-fid's and torch-fidelity's pure-Python InceptionV3)
  built for another torch than this machine's: its compiled operators cannot load, so their
  meta registrations (torch.library.register_fake) are skipped during the import."""
  import torch

  if "torchvision" in sys.modules:
    return sys.modules["torchvision"]
  real = torch.library.register_fake
  torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
  try:
    import torchvision
  finally:
    torch.library.register_fake = real
  return torchvision


def _make_ckpt_module():
  spec = importlib.util.spec_from_file_location("make_ckpt", os.path.join(DATA, "make_ckpt.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="session")
def torch_ckpt(tmp_path_factory):
  """torch_ckpt(case) -> path of the .pt file rebuilt (sha256-checked) from tests/data/<case>."""
  import torch

  make_ckpt = _make_ckpt_module()
  root = tmp_path_factory.mktemp("torch_ckpts")
  cache = {}

  def build(case):
    if case not in cache:
      path = str(root / f"{case}.pt")
      torch.save(make_ckpt.build_checkpoint(os.path.join(DATA, case)), path)
      cache[case] = path
    return cache[case]

  return build


def ref(case, name="outputs.npz"):
  """The reference arrays of a case (NCHW, as made by the original PyTorch code)."""
  return np.load(os.path.join(DATA, case, name))


def nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


def assert_close_rel(got, want, rel, what=""):
  """max|got - want| <= rel * RMS(want): the tolerance form of the parity targets."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  rms = np.sqrt(np.mean(want ** 2))
  err = np.max(np.abs(got - want))
  if os.environ.get("GRAIN_PRINT_PARITY"):
    print(f"PARITY {what}: max abs err {err:.3g}, rms {rms:.3g}, ratio {err / rms:.2g}")
  assert err <= rel * rms, f"{what}: max abs err {err:.3g} > {rel:g} * rms {rms:.3g}"
  return err


# Compiled programs are cached on disk for the CLI runs the tests start (see
# cli/program.py's enable_compilation_cache); only compile time changes, never results.
os.environ.setdefault("GRAIN_JAX_CACHE", os.path.join(ROOT, ".pytest_cache", "xla"))

# The suite compiles hundreds of small programs and runs each a few times, so LLVM's
# optimisation passes cost more than they save: level 0 halves the compile time of a training
# step. Results do not change (fast-math stays off; convolutions are library calls either way).
# Users' programs keep XLA's default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()


def xla_flags(*flags):
  """XLA_FLAGS for a subprocess: the suite's flags plus `flags`."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def write_png16(path, a):
  """Writes a 16-bit PNG (gray HxW or RGB HxWx3) with zlib alone; Pillow cannot write 16-bit RGB."""
  import struct
  import zlib
  a = np.asarray(a, ">u2")
  h, w = a.shape[:2]
  raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))
  chunk = lambda t, d: (struct.pack(">I", len(d)) + t + d
                        + struct.pack(">I", zlib.crc32(t + d)))
  header = struct.pack(">IIBBBBB", w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory):
  """A converted-weights directory of the small config (random init) with LPIPS weights."""
  from grain_jax.formats import weights
  from grain_jax.nets import registry
  from grain_jax.nets.model_config import grain_small
  from grain_jax.nets.model import GRAIN, init_variables, per_network_variables

  cfg = grain_small()
  tree = per_network_variables(init_variables(GRAIN.from_config(cfg), 0))
  tree["lpips"] = registry.convert("lpips", "builtin", cfg)[0]
  path = str(tmp_path_factory.mktemp("weights") / "small")
  weights.save_weights(path, tree, cfg, {})
  return path


@pytest.fixture(scope="session")
def small_model(small_weights):
  """grain_jax.load of `small_weights` (shared, so its jitted methods compile once)."""
  import grain_jax
  return grain_jax.load(small_weights)


def hook_training_step(monkeypatch, before):
  """Makes every training the training loop creates call before(stage, n) ahead of its n-th
  step (1-based), e.g. to kill the run or send it a signal there; returns a function that
  removes the hook."""
  from grain_jax.train import loop
  real = loop.create_training

  def create(cfg, *args, **kw):
    training, calls = real(cfg, *args, **kw), []

    def step(state, batch, loss_vars):
      calls.append(1)
      before(cfg.stage, len(calls))
      return training.step(state, batch, loss_vars)
    return training._replace(step=step)

  monkeypatch.setattr(loop, "create_training", create)
  return lambda: monkeypatch.setattr(loop, "create_training", real)


def kill_at(n, stage=None):
  """A `before` for hook_training_step: KeyboardInterrupt ahead of step n (of `stage`)."""
  def before(s, k):
    if k == n and stage in (None, s):
      raise KeyboardInterrupt("killed")
  return before


def signal_at(n, signum, stage=None):
  """A `before` for hook_training_step: sends `signum` to this process ahead of step n (of
  `stage`), as a scheduler would."""
  def before(s, k):
    if k == n and stage in (None, s):
      os.kill(os.getpid(), signum)
  return before


# The longest files first. With two processes (.ci/run: pytest -n 2 --dist loadfile) each
# takes whole files in collection order, and a long file taken last runs alone at the end
# (the parity file, ~14 min, made the suite 27 min instead of ~22).
LONGEST_FIRST = ("test_training_parity.py", "test_multiprocess.py", "test_training.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order
