"""NVIDIA StyleGAN2-ADA `.pkl` snapshots (stylegan2-ada-pytorch, also what stylegan3's code
writes for StyleGAN2 configs), read without running any code they hold.

Such a snapshot is a plain pickle of {'G', 'D', 'G_ema', 'augment_pipe', ...} whose networks
are "persistent objects": the pickle stores each module's Python source and calls
`torch_utils.persistence._reconstruct_persistent_obj`, which `exec`s that source. Here the
unpickler's `find_class` allows a fixed list of globals only (tensor and parameter rebuilds,
OrderedDict, set, numpy scalars and dtypes, dnnlib's EasyDict as a dict) and replaces the
reconstructor with `PersistentObject`, which keeps the class name and the module state (its
parameters, buffers, submodules and attributes) and never looks at the source. Any other
global is refused with one line naming it. Storages are read by `torch.load(weights_only=True)`.

The networks are then mapped onto rosinality's StyleGAN2 layout (what nets/stylegan2.py and
nets/discriminators.py convert): G_ema's mapping fc0..fcN, synthesis bR.conv0/conv1/torgb with
their const noise and strengths, and the mapping's w_avg as the latent average; D's bR.fromrgb,
conv0, conv1, skip and the b4 epilogue (minibatch stddev, conv, fc, out). Resolution, widths,
mapping depth and conv_clamp come from the file (`generator_architecture`,
`discriminator_architecture`). What rosinality's layout
cannot hold exactly (a conditional model, StyleGAN3, a 'resnet' or 'orig' generator, a
'skip' discriminator, other filters) is refused, saying what differs.
"""
from __future__ import annotations

import collections
import functools
import io
import os
import pickle
from typing import Any

import numpy as np

from grain_jax.nets.torch_import import CheckpointError

BLUR = (1, 3, 3, 1)  # rosinality's (and ADA's default) resample filter


class UnsafePickleError(CheckpointError):
  """A pickle that asks for a global outside the allowed list (it could run code)."""


class PersistentObject:
  """What `_reconstruct_persistent_obj(meta)` would have rebuilt: its class name and state
  (module attributes, `_parameters`, `_buffers`, `_modules`). The embedded source is dropped.
  Slots only: a pickle cannot give an instance attributes (methods) of its own."""
  __slots__ = ("class_name", "state")

  def __init__(self, meta):
    if not isinstance(meta, dict) or meta.get("type") != "class":
      raise UnsafePickleError("a persistent object without the expected metadata")
    self.class_name = str(meta.get("class_name"))
    state = meta.get("state")
    self.state = dict(state) if isinstance(state, dict) else {}

  def __repr__(self):
    return f"PersistentObject({self.class_name})"

  def child(self, name: str):
    return (self.state.get("_modules") or {}).get(name)

  def children(self) -> dict:
    return dict(self.state.get("_modules") or {})

  def tensors(self) -> dict:
    """This module's own parameters and buffers, as numpy arrays."""
    out = {}
    for group in ("_parameters", "_buffers"):
      for k, v in (self.state.get(group) or {}).items():
        if v is not None:
          out[k] = v
    return out

  def attr(self, name: str, default=None):
    return self.state.get(name, default)


class _EasyDict(dict):
  """dnnlib.EasyDict's place: a dict (its attribute access is not needed)."""

  def __setstate__(self, state):
    if state:
      self.update(state)


def _torch():
  try:
    import torch  # deferred: the optional [torch] extra, as for .pt files
  except ImportError:
    raise CheckpointError("reading StyleGAN2-ADA .pkl files needs torch; install it with "
                          "pip install 'grain-jax[torch]'") from None
  return torch


def _storage_from_bytes(data):
  """torch.storage._load_from_bytes: a storage saved with torch.save inside the pickle."""
  if not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError("a storage that is not bytes")
  return _torch().load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_array(storage, offset, size, stride, dtype=None):
  """The tensor's values (a copy); torch checks the view against the storage's size."""
  torch = _torch()
  if isinstance(storage, torch.TypedStorage):
    dtype = storage.dtype
  elif not (isinstance(storage, torch.UntypedStorage) and isinstance(dtype, torch.dtype)):
    raise UnsafePickleError(f"a tensor rebuilt from a {type(storage).__name__}")
  if not (isinstance(offset, int) and all(isinstance(s, int) for s in (*size, *stride))):
    raise UnsafePickleError("a tensor with a malformed size or stride")
  t = torch.empty(0, dtype=dtype).set_(storage, offset, tuple(size), tuple(stride))
  return t.detach().numpy().copy()


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _numpy_array(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  return _numpy_array(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, *unused):
  return data


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise UnsafePickleError(f"a numpy scalar of dtype {dtype}")
  return np.frombuffer(data, dtype)[0] if data is not None else dtype.type()


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
}


class _SafeUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    try:
      return ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(f"refused: the pickle asks for {module}.{name}, which a "
                              f"StyleGAN2-ADA snapshot does not need (loading it could run "
                              f"code)") from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f"refused: the pickle holds a persistent id ({str(pid)[:40]}), "
                            f"which a StyleGAN2-ADA snapshot does not")


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> Any:
  try:
    with open(path, "rb") as f:
      return _SafeUnpickler(f).load()
  except UnsafePickleError as e:
    raise UnsafePickleError(f"{path}: {e}") from None
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
          RuntimeError, IndexError, KeyError) as e:
    detail = str(e).splitlines()[0][:120] if str(e) else ""
    raise CheckpointError(f"{path}: not a complete StyleGAN2-ADA pickle (truncated or "
                          f"corrupt? {type(e).__name__}: {detail})") from None


def load_snapshot(path: str) -> dict:
  """The snapshot dict of a StyleGAN2-ADA `.pkl`, its networks as PersistentObjects and its
  tensors as numpy arrays; nothing in the file is executed."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  st = os.stat(path)
  obj = _load_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a StyleGAN2-ADA snapshot (a dict with G_ema and "
                          f"D), found {type(obj).__name__}")
  return obj


def _network(path: str, key: str, class_name: str) -> PersistentObject:
  snap = load_snapshot(path)
  net = snap.get(key)
  if not isinstance(net, PersistentObject):
    found = ", ".join(str(k) for k in snap) or "nothing"
    raise CheckpointError(f"{path}: no {key} network in this pickle (it holds {found}); a "
                          f"StyleGAN2-ADA training snapshot has G_ema and D")
  if net.class_name != class_name:
    raise CheckpointError(f"{path}: {key} is a {net.class_name}, not StyleGAN2-ADA's "
                          f"{class_name}")
  return net


def _layout_errors(network: str):
  """Turns a lookup that fails inside a network's state (a tensor or submodule it lacks) into
  one CheckpointError naming the network and what was missing."""
  def wrap(fn):
    @functools.wraps(fn)
    def run(path: str):
      try:
        return fn(path)
      except CheckpointError:
        raise
      except (KeyError, AttributeError, TypeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: {network} is not laid out as StyleGAN2-ADA's "
                              f"({type(e).__name__}: {e})") from None
    return run
  return wrap


def _need(cond: bool, path: str, message: str) -> None:
  if not cond:
    raise CheckpointError(f"{path}: {message}; grain_jax's StyleGAN2 (rosinality's layout) "
                          f"cannot represent it exactly")


def _filter_ok(f) -> bool:
  """ADA's resample_filter buffer (a normalised outer product) is rosinality's BLUR."""
  k = np.asarray(BLUR, np.float64)
  want = np.outer(k, k) / np.outer(k, k).sum()
  return f is None or (np.shape(f) == want.shape and np.allclose(f, want, atol=1e-6))


def _clamp(path: str, layers) -> float:
  """The one conv_clamp of these layers (None in the file: 0, no clamp)."""
  values = {layer.attr("conv_clamp") for layer in layers}
  _need(len(values) == 1, path,
        f"layers with different conv_clamp values {sorted(map(str, values))}")
  v = values.pop()
  return 0.0 if v is None else float(v)


def _lr_multiplier(fc: PersistentObject) -> float:
  """A FullyConnectedLayer's lr_multiplier: it keeps it as bias_gain (and weight_gain =
  lr_multiplier / sqrt(in_features))."""
  return float(fc.attr("bias_gain", 1.0))


def _synthesis_blocks(path: str, g: PersistentObject) -> list[tuple[int, PersistentObject]]:
  syn = g.child("synthesis")
  _need(isinstance(syn, PersistentObject), path, "G_ema has no synthesis network")
  names = list(syn.children())
  if any(n == "input" or n.startswith("L") for n in names):
    _need(False, path, "G_ema is a StyleGAN3 (alias-free) generator, not a StyleGAN2")
  res = int(g.attr("img_resolution"))
  want = [f"b{2 ** i}" for i in range(2, int(np.log2(res)) + 1)]
  _need(names == want, path, f"G_ema's synthesis blocks are {names}, not {want}")
  blocks = [(int(n[1:]), syn.child(n)) for n in names]
  for r, b in blocks:
    arch = b.attr("architecture", "skip")
    _need(arch == "skip", path, f"G_ema's synthesis architecture is {arch!r}, not 'skip' "
                                f"(StyleGAN2's config-f generator)")
  return blocks


def _dense(prefix: str, layer: PersistentObject) -> dict:
  t = layer.tensors()
  return {f"{prefix}.weight": t["weight"], f"{prefix}.bias": t["bias"]}


def _styled(prefix: str, layer: PersistentObject, path: str) -> tuple[dict, np.ndarray]:
  """A SynthesisLayer -> rosinality StyledConv keys, and its const noise (R, R)."""
  t = layer.tensors()
  _need(layer.attr("activation", "lrelu") == "lrelu", path,
        f"a synthesis layer with activation {layer.attr('activation')!r}")
  _need(_filter_ok(t.get("resample_filter")), path, "a resample filter other than [1,3,3,1]")
  res = int(layer.attr("resolution"))
  noise = t.get("noise_const")
  strength = t.get("noise_strength")
  if not layer.attr("use_noise", True) or noise is None:
    noise, strength = np.zeros((res, res), np.float32), np.zeros((), np.float32)
  sd = {f"{prefix}.conv.weight": t["weight"][None],
        f"{prefix}.noise.weight": np.reshape(strength, (1,)),
        f"{prefix}.activate.bias": t["bias"],
        **_dense(f"{prefix}.conv.modulation", layer.child("affine"))}
  if int(layer.attr("up", 1)) == 2:
    sd[f"{prefix}.conv.blur.kernel"] = _rosinality_fir(4.0)
  return sd, noise


def _rosinality_fir(gain: float) -> np.ndarray:
  k = np.outer(BLUR, BLUR).astype(np.float32)
  return k / k.sum() * gain


def _to_rgb(prefix: str, layer: PersistentObject, upsample: bool) -> dict:
  t = layer.tensors()
  sd = {f"{prefix}.conv.weight": t["weight"][None],
        f"{prefix}.bias": t["bias"].reshape(1, -1, 1, 1),
        **_dense(f"{prefix}.conv.modulation", layer.child("affine"))}
  if upsample:
    sd[f"{prefix}.upsample.kernel"] = _rosinality_fir(4.0)
  return sd


@_layout_errors("G_ema")
def generator_state_dict(path: str) -> tuple[dict, list[str]]:
  """G_ema of a StyleGAN2-ADA pickle as a rosinality g_ema state dict with 'latent_avg' (the
  mapping's w_avg); (state dict, [path])."""
  g = _network(path, "G_ema", "Generator")
  arch = generator_architecture(path)
  mapping = g.child("mapping")
  sd = {}
  for i in range(arch["n_mlp"]):
    sd.update(_dense(f"style.{i + 1}", mapping.child(f"fc{i}")))
  noises = []
  for j, (res, block) in enumerate(_synthesis_blocks(path, g)):
    if res == 4:
      sd["input.input"] = block.tensors()["const"][None]
      part, noise = _styled("conv1", block.child("conv1"), path)
      sd.update(part)
      noises.append(noise)
      sd.update(_to_rgb("to_rgb1", block.child("torgb"), False))
      continue
    for m, name in ((2 * (j - 1), "conv0"), (2 * (j - 1) + 1, "conv1")):
      part, noise = _styled(f"convs.{m}", block.child(name), path)
      sd.update(part)
      noises.append(noise)
    sd.update(_to_rgb(f"to_rgbs.{j - 1}", block.child("torgb"), True))
    _need(_filter_ok(block.tensors().get("resample_filter")), path,
          "a resample filter other than [1,3,3,1]")
  for i, n in enumerate(noises):
    sd[f"noises.noise_{i}"] = np.asarray(n, np.float32)[None, None]
  sd["latent_avg"] = mapping.tensors()["w_avg"]
  return sd, [path]


@_layout_errors("G_ema")
def generator_architecture(path: str) -> dict:
  """The generator fields of the model config this G_ema needs: hr_size, and generator's
  style_dim, n_mlp, channels, lr_mlp, conv_clamp. Refuses what rosinality's layout cannot
  hold."""
  g = _network(path, "G_ema", "Generator")
  c_dim, z_dim, w_dim = (int(g.attr(k) or 0) for k in ("c_dim", "z_dim", "w_dim"))
  _need(c_dim == 0, path, f"G_ema is conditional (c_dim={c_dim})")
  _need(int(g.attr("img_channels", 3)) == 3, path,
        f"G_ema makes {g.attr('img_channels')}-channel images, not RGB")
  _need(z_dim == w_dim, path, f"G_ema's z_dim {z_dim} differs from its w_dim {w_dim}")
  mapping = g.child("mapping")
  _need(isinstance(mapping, PersistentObject), path, "G_ema has no mapping network")
  fcs = [n for n in mapping.children() if n.startswith("fc")]
  _need(sorted(mapping.children()) == sorted(fcs) and fcs == [f"fc{i}" for i in range(len(fcs))],
        path, f"G_ema's mapping has layers {list(mapping.children())}, not fc0..fcN only")
  lrs = {_lr_multiplier(mapping.child(n)) for n in fcs}
  acts = {mapping.child(n).attr("activation", "lrelu") for n in fcs}
  _need(len(lrs) == 1 and acts == {"lrelu"}, path,
        f"G_ema's mapping layers mix learning-rate multipliers {sorted(lrs)} or activations "
        f"{sorted(map(str, acts))}")
  _need(mapping.attr("w_avg_beta") is not None and "w_avg" in mapping.tensors(), path,
        "G_ema's mapping has no w_avg (the latent average GRAIN adds to every code)")
  blocks = _synthesis_blocks(path, g)
  layers = [b.child(n) for _, b in blocks for n in ("conv0", "conv1", "torgb")
            if b.child(n) is not None]
  return dict(hr_size=int(g.attr("img_resolution")), style_dim=w_dim, n_mlp=len(fcs),
              channels=tuple(int(b.tensors()["const"].shape[0]) if r == 4 else
                             int(b.child("conv1").tensors()["weight"].shape[0])
                             for r, b in blocks),
              lr_mlp=lrs.pop(), conv_clamp=_clamp(path, layers))


def _d_blocks(path: str, d: PersistentObject) -> list[tuple[int, PersistentObject]]:
  res = int(d.attr("img_resolution"))
  names = list(d.children())
  want = [f"b{2 ** i}" for i in range(int(np.log2(res)), 1, -1)]
  _need(names == want, path, f"D's blocks are {names}, not {want}")
  return [(int(n[1:]), d.child(n)) for n in names]


@_layout_errors("D")
def discriminator_architecture(path: str) -> dict:
  """The discriminator fields of the model config this D needs: resolution, channels,
  stddev_group, conv_clamp."""
  d = _network(path, "D", "Discriminator")
  c_dim = int(d.attr("c_dim") or 0)
  _need(c_dim == 0, path, f"D is conditional (c_dim={c_dim})")
  _need(int(d.attr("img_channels", 3)) == 3, path,
        f"D reads {d.attr('img_channels')}-channel images")
  blocks = _d_blocks(path, d)
  convs = []
  for res, b in blocks[:-1]:
    arch = b.attr("architecture", "resnet")
    _need(arch == "resnet", path, f"D's architecture is {arch!r}, not 'resnet' (StyleGAN2's "
                                  f"config-f discriminator)")
    _need(_filter_ok(b.tensors().get("resample_filter")), path,
          "a resample filter other than [1,3,3,1]")
    convs += [b.child(n) for n in ("fromrgb", "conv0", "conv1") if b.child(n) is not None]
    skip = b.child("skip")
    _need(skip is not None and skip.attr("conv_clamp") is None, path,
          f"D's block b{res} has no unclamped skip connection")
  epilogue = blocks[-1][1]
  mbstd = epilogue.child("mbstd")
  _need(mbstd is not None and int(mbstd.attr("num_channels", 1)) == 1, path,
        "D's epilogue has no minibatch-stddev layer of one channel")
  _need(int(epilogue.attr("cmap_dim") or 0) == 0, path, "D's epilogue projects a label (cmap)")
  for n in ("fc", "out"):
    _need(_lr_multiplier(epilogue.child(n)) == 1.0, path,
          f"D's epilogue {n} has a learning-rate multiplier")
  group = mbstd.attr("group_size")
  _need(group is not None, path, "D's minibatch-stddev group is the whole batch (None)")
  convs.append(epilogue.child("conv"))
  channels = [int(blocks[0][1].child("fromrgb").tensors()["weight"].shape[0])]
  channels += [int(b.child("conv1").tensors()["weight"].shape[0]) for _, b in blocks[:-1]]
  return dict(hr_size=int(d.attr("img_resolution")), channels=tuple(reversed(channels)),
              stddev_group=int(group), conv_clamp=_clamp(path, convs))


@_layout_errors("D")
def discriminator_state_dict(path: str) -> tuple[dict, list[str]]:
  """D of a StyleGAN2-ADA pickle as a rosinality `d` state dict; (state dict, [path])."""
  d = _network(path, "D", "Discriminator")
  discriminator_architecture(path)
  blocks = _d_blocks(path, d)

  def conv(prefix, layer, index):
    t = layer.tensors()
    sd = {f"{prefix}.{index}.weight": t["weight"]}
    if "bias" in t:
      sd[f"{prefix}.{index + 1}.bias"] = t["bias"]
    if index == 1:
      sd[f"{prefix}.0.kernel"] = _rosinality_fir(1.0)
    return sd

  sd = conv("convs.0", blocks[0][1].child("fromrgb"), 0)
  for k, (_, b) in enumerate(blocks[:-1], start=1):
    sd.update(conv(f"convs.{k}.conv1", b.child("conv0"), 0))
    sd.update(conv(f"convs.{k}.conv2", b.child("conv1"), 1))
    sd.update(conv(f"convs.{k}.skip", b.child("skip"), 1))
  epilogue = blocks[-1][1]
  sd.update(conv("final_conv", epilogue.child("conv"), 0))
  sd.update(_dense("final_linear.0", epilogue.child("fc")))
  sd.update(_dense("final_linear.1", epilogue.child("out")))
  return sd, [path]


def is_pickle(path) -> bool:
  """A `.pkl` source (StyleGAN2-ADA) rather than a PyTorch `.pt` file."""
  return isinstance(path, str) and path.lower().endswith(".pkl")
