"""Makes this folder's fixtures with NVIDIA's stylegan2-ada-pytorch (README.md here: how).

    python make_fixtures.py --ada /path/to/stylegan2-ada-pytorch --out .

Builds a tiny G and D of that code (the sizes of tests/tiny_config.py), gives every tensor
synthetic values, pickles them as its training loop writes a snapshot (tiny.pkl), and records
what they compute on CPU (reference.npz). Nothing of that repository is copied here: it is
imported from --ada at run time.
"""
import argparse
import copy
import os
import pickle
import sys

import numpy as np
import torch

# The tiny GRAIN config's StyleGAN2 (tests/tiny_config.py): 32 px, widths 32, 32, 16, 8 at
# 4..32 px (channel_base 256 // res, at most 32), 32-d latents, 2 mapping layers; the
# minibatch-stddev group of 4. conv_clamp is small so that it changes outputs (ADA's configs
# use 256, which rarely binds).
RES, Z_DIM, W_DIM, N_MLP, CBASE, CMAX, CLAMP, MBSTD = 32, 32, 32, 2, 256, 32, 1, 4


def build(networks):
  G = networks.Generator(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, img_resolution=RES, img_channels=3,
                         mapping_kwargs=dict(num_layers=N_MLP),
                         synthesis_kwargs=dict(channel_base=CBASE, channel_max=CMAX,
                                               num_fp16_res=0, conv_clamp=CLAMP))
  D = networks.Discriminator(c_dim=0, img_resolution=RES, img_channels=3, channel_base=CBASE,
                             channel_max=CMAX, num_fp16_res=0, conv_clamp=CLAMP,
                             epilogue_kwargs=dict(mbstd_group_size=MBSTD))
  return G, D


def synthetic(module, gen):
  """Every parameter and the w_avg buffer get seeded values of their usual scale: weights
  N(0, 1) (the code's own init), biases, noise strengths and w_avg nonzero."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.from_numpy(gen.standard_normal(p.shape).astype(np.float32))
      if name.endswith("bias"):
        p.copy_(p + 0.2 * r)        # the affines' bias starts at 1
      elif name.endswith("noise_strength"):
        p.copy_(0.3 * r)
      else:
        p.copy_(r / (100.0 if ".fc" in name and "mapping" in name else 1.0))  # lr_multiplier
    for name, b in module.named_buffers():
      if name.endswith("w_avg"):
        b.copy_(torch.from_numpy(0.3 * gen.standard_normal(b.shape).astype(np.float32)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--ada", required=True, help="a checkout of NVlabs/stylegan2-ada-pytorch")
  p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  a = p.parse_args()
  sys.path.insert(0, os.path.abspath(a.ada))
  from training import networks  # noqa: E402  (the original's code, from --ada)

  torch.manual_seed(0)
  gen = np.random.default_rng(2026)
  G, D = build(networks)
  synthetic(G, gen)
  synthetic(D, gen)
  G_ema = copy.deepcopy(G)  # G and G_ema differ in a trained file: make G's weights differ
  with torch.no_grad():
    for p_ in G.parameters():
      p_.mul_(0.5)

  # As training_loop.py writes a snapshot: deep copies in eval mode on the CPU, one pickle.
  snapshot = dict(training_set_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                           path="synthetic", resolution=RES))
  for name, module in [("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", None)]:
    if module is not None:
      module = copy.deepcopy(module).eval().requires_grad_(False).cpu()
    snapshot[name] = module
  with open(os.path.join(a.out, "tiny.pkl"), "wb") as f:
    pickle.dump(snapshot, f)

  z = gen.standard_normal((3, Z_DIM)).astype(np.float32)
  ws = gen.standard_normal((3, G_ema.num_ws, W_DIM)).astype(np.float32)
  img4 = gen.uniform(-1, 1, (4, 3, RES, RES)).astype(np.float32)
  with torch.no_grad():
    g = G_ema.eval()
    from_z = g(torch.from_numpy(z), None, truncation_psi=1, noise_mode="const")
    from_w = g.synthesis(torch.from_numpy(ws), noise_mode="const")
    w_of_z = g.mapping(torch.from_numpy(z), None, truncation_psi=1)
    d = D.eval()
    d4 = d(torch.from_numpy(img4), None)        # one minibatch-stddev group of 4
    d2 = d(torch.from_numpy(img4[:2]), None)    # a group of 2 (the batch)
  np.savez(os.path.join(a.out, "reference.npz"), z=z, ws=ws, images=img4,
           g_from_z=from_z.numpy(), g_from_w=from_w.numpy(), w_of_z=w_of_z.numpy(),
           w_avg=G_ema.mapping.w_avg.numpy(), d_of_4=d4.numpy(), d_of_2=d2.numpy(),
           torch_version=np.array(torch.__version__))
  for k, v in (("g_from_z", from_z), ("g_from_w", from_w), ("d_of_4", d4)):
    print(k, tuple(v.shape), "rms", float(v.square().mean().sqrt()))


if __name__ == "__main__":
  main()
