"""Key lists of the official checkpoints at any size, for files that cannot be downloaded here.

The rules are checked against the reference key lists at 256 (tests/data/*/keys.json, made
from the original modules' state_dict()); the 1024 files are then built from the same rules
with random values, to prove the 1024 configuration converts and runs end to end.
"""
import math

import numpy as np

from grain_jax.nets.stylegan2 import default_channels


def _ch(size, cm=2):
  return dict(zip((4 * 2 ** i for i in range(9)), default_channels(1024, cm)))[size]


def generator_keys(size, style_dim=512, n_mlp=8):
  """rosinality Generator(size, style_dim, n_mlp).state_dict(): [(name, shape)] in order."""
  keys = []
  for i in range(1, n_mlp + 1):
    keys += [(f"style.{i}.weight", (style_dim, style_dim)), (f"style.{i}.bias", (style_dim,))]
  c4 = _ch(4)

  def styled(name, cin, cout, up):
    out = [(f"{name}.conv.weight", (1, cout, cin, 3, 3))]
    if up:
      out.append((f"{name}.conv.blur.kernel", (4, 4)))
    return out + [(f"{name}.conv.modulation.weight", (cin, style_dim)),
                  (f"{name}.conv.modulation.bias", (cin,)), (f"{name}.noise.weight", (1,)),
                  (f"{name}.activate.bias", (cout,))]

  def to_rgb(name, cin, up):
    out = [(f"{name}.bias", (1, 3, 1, 1))]
    if up:
      out.append((f"{name}.upsample.kernel", (4, 4)))
    return out + [(f"{name}.conv.weight", (1, 3, cin, 1, 1)),
                  (f"{name}.conv.modulation.weight", (cin, style_dim)),
                  (f"{name}.conv.modulation.bias", (cin,))]

  keys.append(("input.input", (1, c4, 4, 4)))
  keys += styled("conv1", c4, c4, False) + to_rgb("to_rgb1", c4, False)
  log = int(math.log2(size))
  cin = c4
  convs, rgbs = [], []
  for j, i in enumerate(range(3, log + 1)):
    c = _ch(2 ** i)
    convs += styled(f"convs.{2 * j}", cin, c, True) + styled(f"convs.{2 * j + 1}", c, c, False)
    rgbs += to_rgb(f"to_rgbs.{j}", c, True)
    cin = c
  keys += convs + rgbs
  for n in range((log - 2) * 2 + 1):
    r = 2 ** ((n + 5) // 2)
    keys.append((f"noises.noise_{n}", (1, 1, r, r)))
  return keys


def discriminator_keys(size):
  """rosinality Discriminator(size).state_dict(): [(name, shape)] in order."""
  log = int(math.log2(size))
  c = _ch(size)
  keys = [("convs.0.0.weight", (c, 3, 1, 1)), ("convs.0.1.bias", (c,))]
  for k, i in enumerate(range(log, 2, -1), start=1):
    co = _ch(2 ** (i - 1))
    keys += [(f"convs.{k}.conv1.0.weight", (c, c, 3, 3)), (f"convs.{k}.conv1.1.bias", (c,)),
             (f"convs.{k}.conv2.0.kernel", (4, 4)), (f"convs.{k}.conv2.1.weight", (co, c, 3, 3)),
             (f"convs.{k}.conv2.2.bias", (co,)), (f"convs.{k}.skip.0.kernel", (4, 4)),
             (f"convs.{k}.skip.1.weight", (co, c, 1, 1))]
    c = co
  c4 = _ch(4)
  keys += [("final_conv.0.weight", (c4, c + 1, 3, 3)), ("final_conv.1.bias", (c4,)),
           ("final_linear.0.weight", (c4, c4 * 16)), ("final_linear.0.bias", (c4,)),
           ("final_linear.1.weight", (1, c4)), ("final_linear.1.bias", (1,))]
  return keys


def random_state_dict(keys, seed, blur_gain):
  """Random tensors of the given layout; FIR buffers get their exact values (as in real files)."""
  import torch
  rng = np.random.default_rng(seed)
  k1 = np.array([1, 3, 3, 1], np.float32)
  k2 = np.outer(k1, k1) / np.outer(k1, k1).sum()
  sd = {}
  for name, shape in keys:
    if name.endswith("kernel"):
      v = k2 * blur_gain(name)
    elif name.endswith(("modulation.bias",)):
      v = 1 + 0.05 * rng.standard_normal(shape)
    elif name.endswith(("bias", "noise.weight")):
      v = 0.05 * rng.standard_normal(shape)
    elif name.startswith("style."):
      v = 100 * rng.standard_normal(shape)
    else:
      v = rng.standard_normal(shape)
    sd[name] = torch.from_numpy(np.asarray(v, np.float32))
  return sd
