"""The published 1024 <-> 16 configuration, end to end, from files of the official layouts.

Parity of each network is proven on the reference cases; this proves what they cannot: the
default (1024) config accepts every official file layout, and upscale/discriminate run.
"""
import json
import os

import numpy as np
import pytest

import grain_jax
from conftest import DATA, convert_cli
from official_layouts import discriminator_keys, generator_keys, random_state_dict

@pytest.mark.parametrize("case,keys", [("stylegan2_gen_256", generator_keys(256)),
                                       ("stylegan2_disc_256", discriminator_keys(256))])
def test_layout_rules_match_the_original_at_256(case, keys):
  with open(os.path.join(DATA, case, "keys.json")) as f:
    want = [(t[0], tuple(t[1])) for t in json.load(f)["tensors"]]
  assert keys == want


def test_1024_convert_load_upscale(torch_ckpt, tmp_path):
  import torch
  gen = random_state_dict(generator_keys(1024), 1, lambda n: 4.0)
  # The FIR gain is 4 for the generator's upsampling kernels, 1 for the discriminator's blur.
  disc = random_state_dict(discriminator_keys(1024), 2, lambda n: 1.0)
  torch.save({"g_ema": gen, "latent_avg": torch.zeros(512)}, tmp_path / "g.pt")
  torch.save({"d": disc}, tmp_path / "d.pt")
  out = tmp_path / "w1024"
  r = convert_cli(out, "--stylegan2", tmp_path / "g.pt", "--discriminator", tmp_path / "d.pt",
                  "--invrrdb", torch_ckpt("grain_invrrdb"), "--codestylegan",
                  torch_ckpt("grain_fea2code"), "--fusion", torch_ckpt("grain_fusion"),
                  "--irse50", torch_ckpt("irse50_112"), "--lpips", "builtin")
  assert r.returncode == 0, r.stderr
  m = grain_jax.load(str(out))
  assert m.networks == {"rescaler", "fea2code", "generator", "fusion", "discriminator",
                        "irse50", "lpips"}
  x = np.random.default_rng(0).uniform(-1, 1, (1, 1024, 1024, 3)).astype(np.float32)
  lr = m.downscale(x)
  assert lr.shape == (1, 16, 16, 3)
  out = m.upscale(lr)
  assert out["codes"].shape == (1, 18, 512)
  for k in ("hr", "hr_inv", "hr_gan"):
    assert out[k].shape == (1, 1024, 1024, 3) and np.isfinite(np.asarray(out[k])).all()
  assert m.discriminate(out["hr"]).shape == (1, 1)
  with pytest.raises(ValueError, match="1024, 1024, 3"):
    m.downscale(x[:, :512, :512])
  with pytest.raises(ValueError, match="16, 16, 3"):
    m.upscale(x)
