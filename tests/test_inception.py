"""The FID InceptionV3 against pytorch-fid's own module with the same synthetic weights (of the
real layout; nothing is downloaded). (The distances' maths: test_fid.py.)"""
import numpy as np
import pytest
import torch

from conftest import import_torchvision

import_torchvision()  # before pytorch_fid / torch_fidelity import it


def pt_inception_state_dict():
  """Seeded random weights in the layout of pytorch-fid's pt_inception-2015-12-05-*.pth
  (torchvision's InceptionV3 with pytorch-fid's FID blocks), as torch tensors."""
  import pytorch_fid.inception as pfi

  skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                      ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                      ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                      ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                      ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                      ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                      ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
    setattr(skeleton, name, block)
  g = torch.Generator().manual_seed(0)
  sd = {}
  for k, v in skeleton.state_dict().items():
    if k.endswith("num_batches_tracked"):
      sd[k] = v
    elif k.endswith("conv.weight"):  # He init keeps 90 layers of activations in range
      sd[k] = torch.randn(v.shape, generator=g) * (2.0 / np.prod(v.shape[1:])) ** 0.5
    elif k.endswith("running_var"):
      sd[k] = torch.rand(v.shape, generator=g) + 0.5
    elif k.endswith("bn.weight"):
      sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
    else:  # biases, running means, fc
      sd[k] = 0.1 * torch.randn(v.shape, generator=g)
  return sd


def _pytorch_fid_module(monkeypatch):
  """pytorch-fid's module, its 'download' answered with pt_inception_state_dict()."""
  import pytorch_fid.inception as pfi

  sd = pt_inception_state_dict()
  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
  return sd, pfi


@pytest.mark.parametrize("dims", [2048, 192])
def test_features_match_pytorch_fid(monkeypatch, dims):
  import jax
  from grain_jax.nets import inception
  from grain_jax.nets.torch_import import TorchReader

  sd, pfi = _pytorch_fid_module(monkeypatch)
  block = pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
  ref_net = pfi.InceptionV3([block], resize_input=True, normalize_input=True,
                            use_fid_inception=True).eval()
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (3, 128, 96, 3)).astype(np.float32)  # non-square, resized to 299
  with torch.no_grad():
    want = ref_net(torch.from_numpy(x).permute(0, 3, 1, 2))[0]
  want = torch.nn.functional.adaptive_avg_pool2d(want, 1).squeeze(-1).squeeze(-1).numpy()

  reader = TorchReader({k: v.numpy() for k, v in sd.items()}, "pt_inception")
  variables = inception.from_torch(reader)
  assert reader.unused() == []
  if dims != 2048:  # the network up to a smaller block takes a prefix of the variables
    keep = inception.expected_variables(dims)
    variables = jax.tree_util.tree_map(lambda _, v: v, keep,
                                       {c: {k: variables[c][k] for k in keep[c]}
                                        for c in keep})
  got = jax.jit(inception.FIDInceptionV3(dims).apply)(variables, x)
  assert got.shape == (3, dims)
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert err < 1e-4, err


def test_convert_reads_the_pytorch_fid_file(tmp_path, monkeypatch):
  """`grain-jax convert --inception pt_inception-....pth` gives the network pytorch-fid runs."""
  import jax
  from conftest import convert_cli
  from grain_jax.formats import weights
  from grain_jax.nets import inception

  sd, pfi = _pytorch_fid_module(monkeypatch)
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(sd, path)
  res = convert_cli(tmp_path / "w", "--inception", path)
  assert res.returncode == 0, res.stderr
  tree, _, meta = weights.load_weights(str(tmp_path / "w"))
  assert meta["networks"] == ["inception"]
  x = np.random.default_rng(2).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
  got = jax.jit(inception.FIDInceptionV3().apply)(tree["inception"], x)
  ref_net = pfi.InceptionV3([3], use_fid_inception=True).eval()
  with torch.no_grad():
    want = ref_net(torch.from_numpy(x).permute(0, 3, 1, 2))[0].squeeze(-1).squeeze(-1).numpy()
  assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()
