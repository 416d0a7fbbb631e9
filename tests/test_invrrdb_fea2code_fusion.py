"""GRAIN's own networks (invRRDB, Fea2Code, Fusion) against the original's outputs.

Weights go the user's way: .pt rebuilt from the reference recipe -> grain-jax convert ->
grain_jax.load; the networks are then run from the loaded variables.
"""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_rel, convert_cli, nhwc, ref
import grain_jax
from grain_jax.nets import invrrdb, quantizer
from grain_jax.train import resample_start

@pytest.fixture(scope="module")
def units(torch_ckpt, tmp_path_factory):
  """invRRDB + Fusion converted with the 1024 layout run at 256 <-> 4 (same 64x factor).

  The generator widths of the last three levels are the 1024 model's (128, 64, 32): Fusion
  takes those G features; rosinality's 256 px widths would be (512, 256, 128).
  """
  out = tmp_path_factory.mktemp("w") / "units"
  r = convert_cli(out, "--invrrdb", torch_ckpt("grain_invrrdb"), "--fusion",
                  torch_ckpt("grain_fusion"), "--config.model.hr_size=256",
                  "--config.model.lr_size=4",
                  "--config.model.generator.channels=(512,512,512,512,128,64,32)")
  assert r.returncode == 0, r.stderr
  return grain_jax.load(str(out))


def astronaut_x():
  u8 = ref("grain_units_small", "data.npz")["inv_x_u8"]
  x = (u8.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  return x[None]


def test_encoder_and_quantizer(units):
  want = ref("grain_units_small", "data.npz")
  x = astronaut_x()
  enc = units.downscale(x, quantize=False)
  assert_close_rel(enc, nhwc(want["inv_enc_out"]), 1e-4, "encoder output")
  lr = units.downscale(x)
  np.testing.assert_array_equal(np.asarray(lr), nhwc(want["inv_img1"]))
  # The LR image is exactly 8-bit: a uint8 round trip changes nothing.
  np.testing.assert_array_equal(quantizer.uint8_to_lr(quantizer.lr_to_uint8(lr)), np.asarray(lr))


def test_decoder_and_features(units):
  want = ref("grain_units_small", "data.npz")
  lr = jnp.asarray(nhwc(want["inv_img1"]))
  m = units.model
  hr_inv, feats = jax.jit(lambda v, lr: m.apply(v, lr, method=lambda mm, z: mm.rescaler.decode(z)))(
      units.variables, lr)
  assert_close_rel(hr_inv, nhwc(want["inv_img2"]), 1e-3, "hr_inv")
  for i, f in enumerate(feats):
    r = 4 * 2 ** i
    f64 = np.asarray(f, np.float64)
    if r <= 64:
      assert_close_rel(f, nhwc(want[f"inv_feature_{i}_r{r}"]), 1e-3, f"feature {r}")
    else:
      pool = f64.reshape(1, 16, r // 16, 16, r // 16, 64).mean(axis=(2, 4))
      assert_close_rel(pool, nhwc(want[f"inv_feature_{i}_r{r}_pool16"]), 1e-3, f"pool {r}")
    assert_close_rel(f64.mean(axis=(1, 2)), want[f"inv_feature_{i}_r{r}_chmean"], 1e-3, "chmean")


def test_fusion(units):
  d = ref("grain_units_small", "data.npz")
  xs = [jnp.asarray(nhwc(d[f"fus_x{k}"])) for k in range(3)]
  ys = [jnp.asarray(nhwc(d[f"fus_y{k}"])) for k in range(3)]
  m = units.model
  out = m.apply(units.variables, xs, ys, method=lambda mm, a, b: mm.fusion(a, b))
  want = nhwc(d["fus_out"])
  # The output is bias-dominated (~0.037 +- 2e-3): compare around the per-channel mean.
  got_c = np.asarray(out, np.float64) - np.asarray(out, np.float64).mean(axis=(1, 2), keepdims=True)
  want_c = want.astype(np.float64) - want.astype(np.float64).mean(axis=(1, 2), keepdims=True)
  assert_close_rel(got_c, want_c, 1e-3, "fusion (mean removed)")
  np.testing.assert_allclose(out, want, atol=1e-6)


FEA_SHA = {6: "5969e58315bb21b1dbe434e6051a7435e8656b373166b46448bbdcf61fcce489"}


def fea2code_features(batch2=False):
  feats = []
  for k in range(7):
    r = 16 * 2 ** k
    f = np.random.default_rng(2015 + k).standard_normal((1, 64, r, r)).astype(np.float32)
    if k in FEA_SHA:
      assert hashlib.sha256(f.tobytes()).hexdigest() == FEA_SHA[k], "feature recipe changed"
    if batch2:
      g = np.random.default_rng([2015 + k, 1]).standard_normal((1, 64, r, r)).astype(np.float32)
      f = np.concatenate([f, g], 0)
    feats.append(jnp.asarray(nhwc(f)))
  return feats


@pytest.fixture(scope="module")
def f2c(torch_ckpt, tmp_path_factory):
  out = tmp_path_factory.mktemp("w") / "f2c"
  r = convert_cli(out, "--codestylegan", torch_ckpt("grain_fea2code"))
  assert r.returncode == 0, r.stderr
  g = grain_jax.load(str(out))
  m = g.model
  run = jax.jit(lambda v, f: m.apply(v, f, method=lambda mm, ff: mm.fea2code(ff),
                                     mutable=["intermediates"]))
  return g, run


def test_fea2code_1024(f2c):
  g, run = f2c
  want = ref("grain_fea2code")
  codes, inter = run(g.variables, fea2code_features())
  assert codes.shape == (1, 18, 512)
  assert_close_rel(codes, want["codes_raw"], 1e-4, "codes")
  # Code order: code 2i is block i's second head, 2i+1 its first.
  for i in range(9):
    assert_close_rel(codes[:, 2 * i], want[f"s{i}_c2"], 1e-4, f"code {2 * i}")
    assert_close_rel(codes[:, 2 * i + 1], want[f"s{i}_c1"], 1e-4, f"code {2 * i + 1}")
  blocks = inter["intermediates"]["fea2code"]
  for i in (0, 4, 8):
    assert_close_rel(blocks[f"styles_{i}"]["x16"][0], nhwc(want[f"s{i}_x16"]), 1e-3, f"s{i}_x16")
  for i in (3, 4):
    assert_close_rel(blocks[f"styles_{i}"]["fea"][0], nhwc(want[f"s{i}_fea"]), 1e-3, f"s{i}_fea")
  for i in range(5, 9):
    fea = np.asarray(blocks[f"styles_{i}"]["fea"][0], np.float64)
    r = fea.shape[1]
    pool = fea.reshape(1, 16, r // 16, 16, r // 16, 64).mean(axis=(2, 4))
    assert_close_rel(pool, nhwc(want[f"s{i}_fea_pool16"]), 1e-3, f"s{i}_fea_pool16")
    assert_close_rel(fea[:, :8, :8, :16], nhwc(want[f"s{i}_fea_crop8"]), 1e-3, f"s{i}_crop8")


def test_fea2code_batch2(f2c):
  g, run = f2c
  codes, _ = run(g.variables, fea2code_features(batch2=True))
  assert_close_rel(codes, ref("grain_fea2code")["b2_codes_raw"], 1e-4, "batch-2 codes")


def test_converter_refuses_bad_input(torch_ckpt, tmp_path):
  import torch
  bad = tmp_path / "bad.pt"
  sd = torch.load(torch_ckpt("grain_fusion"), weights_only=True)["state_dict"]
  del sd["out.4.bias"]
  sd["conv1.0.weight"] = torch.zeros(5, 5, 3, 3)
  torch.save({"state_dict": sd}, bad)
  out = tmp_path / "out"
  r = convert_cli(out, "--fusion", str(bad))
  assert r.returncode != 0 and not out.exists()
  assert "out.4.bias" in r.stderr and "conv1_0" in r.stderr, r.stderr
  # A wrong file for the flag, a corrupt file, an existing directory.
  r = convert_cli(out, "--invrrdb", torch_ckpt("grain_fusion"))
  assert r.returncode != 0 and "missing keys" in r.stderr and not out.exists()
  (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
  r = convert_cli(out, "--fusion", str(tmp_path / "corrupt.pt"))
  assert r.returncode != 0 and "corrupt.pt" in r.stderr and not out.exists()
  out.mkdir()
  (out / "keep.txt").write_text("x")
  r = convert_cli(out, "--fusion", torch_ckpt("grain_fusion"))
  assert r.returncode != 0 and "--force" in r.stderr and (out / "keep.txt").exists()


def test_pickled_code_is_refused(tmp_path):
  import pickle
  import torch

  class Evil:
    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "pwned"),))

  path = tmp_path / "evil.pt"
  torch.save({"state_dict": {"x": torch.zeros(1)}, "opts": Evil()}, path, pickle_module=pickle)
  r = convert_cli(tmp_path / "o", "--fusion", str(path))
  assert r.returncode != 0 and "refused" in r.stderr
  assert not (tmp_path / "pwned").exists()


def test_resample_start_is_box_down_nearest_up():
  """init.resample_start: a fresh rescaler that downscales by area averaging and
  upscales by pixel repetition (smooth_levels=0), or with its last two x2 steps bilinear
  (the default: a [1, 2, 1]^2 / 16 filter, zero padded, after each repetition), with every
  dense block's residual branch at zero."""
  from tiny_config import tiny_model
  model = invrrdb.InvRRDB.from_config(tiny_model())  # 32 <-> 4
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  p = resample_start.rescaler_start(params, smooth_levels=0)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  lr = model.apply({"params": p}, x, method=model.encode)
  np.testing.assert_allclose(lr, x.reshape(2, 4, 8, 4, 8, 3).mean((2, 4)), atol=1e-5)
  q = np.asarray(quantizer.quantize(lr))
  hr, _ = model.apply({"params": p}, q, method=model.decode)
  np.testing.assert_allclose(hr, np.repeat(np.repeat(q, 8, 1), 8, 2), atol=1e-5)

  def up_smooth(a):  # x2 repetition, then the 3x3 tent with zero padding
    a = np.pad(np.repeat(np.repeat(a, 2, 1), 2, 2), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = a.shape[1] - 2, a.shape[2] - 2
    return sum(resample_start.TENT[i, j] * a[:, i:i + h, j:j + w]
               for i in range(3) for j in range(3))

  smooth = resample_start.rescaler_start(params)  # 4 -> 8 -> 16 -> 32: the last two smoothed
  hr, _ = model.apply({"params": smooth}, q, method=model.decode)
  np.testing.assert_allclose(hr, up_smooth(up_smooth(np.repeat(np.repeat(q, 2, 1), 2, 2))),
                             atol=1e-5)
  rdb_last = p["decoder"]["level0_RRDB_0"]["RDB1"]["conv5"]["kernel"]
  assert not rdb_last.any()
  # The input params are left as they were; other weights keep their random values.
  assert np.asarray(params["decoder"]["level0_RRDB_0"]["RDB1"]["conv5"]["kernel"]).any()
  k = p["decoder"]["out_0"]["kernel"]
  np.testing.assert_array_equal(k[..., 3:], np.asarray(params["decoder"]["out_0"]["kernel"])[..., 3:])


def test_fusion_resample_start_passes_the_decoder_image_through():
  from grain_jax.nets.fusion import Fusion
  from tiny_config import tiny_model
  model = Fusion.from_config(tiny_model())
  rng = np.random.default_rng(0)
  dec = [jnp.asarray(rng.uniform(-1, 1, (2, s, s, 8)), jnp.float32) for s in (8, 16, 32)]
  g = [jnp.asarray(rng.standard_normal((2, s, s, c)), jnp.float32) for s, c in ((8, 32), (16, 16), (32, 8))]
  params = model.init(jax.random.key(0), dec, g)["params"]
  out = model.apply({"params": resample_start.fusion_start(params, model)}, dec, g)
  np.testing.assert_allclose(out, dec[-1][..., :3], atol=1e-5)
