"""StyleGAN2 generator against rosinality's outputs (tests/data/stylegan2_gen_256)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_rel, nhwc, ref
from grain_jax.nets import registry, stylegan2
from grain_jax.nets.model_config import grain_1024
from grain_jax.nets.torch_import import CheckpointError, load_torch_file

CASE = "stylegan2_gen_256"


def config(hr_size=256):
  cfg = grain_1024()
  cfg.hr_size = hr_size  # generator.channels () = rosinality's widths for hr_size
  return cfg


def _convert(g_ema, latent_avg):
  return registry.from_state_dict("generator", {**g_ema, "latent_avg": latent_avg}, config())


@pytest.fixture(scope="module")
def gen(torch_ckpt):
  model = registry.build("generator", config())
  assert tuple(model.channels) == stylegan2.default_channels(256)
  ckpt = load_torch_file(torch_ckpt(CASE))
  return model, _convert(ckpt["g_ema"], ckpt["latent_avg"]), ckpt


@pytest.fixture(scope="module")
def run(gen):
  model, variables, _ = gen

  @jax.jit
  def f(styles):
    return model.apply(variables, [styles], input_is_latent=styles.ndim == 3,
                       mutable=["intermediates"])

  return f


def test_mapping_matches(gen):
  model, variables, _ = gen
  z = ref(CASE, "inputs.npz")["z"]
  w = model.apply(variables, jnp.asarray(z), method=model.mapping)
  assert_close_rel(w, ref(CASE)["style_z"], 1e-4, "style_z")


@pytest.mark.parametrize("kind", ["z", "wplus"])
def test_image_matches(run, kind):
  inputs = ref(CASE, "inputs.npz")
  want = ref(CASE)
  (img, latent, _), inter = run(jnp.asarray(inputs[kind]))
  assert latent.shape == (2, 14, 512)
  assert_close_rel(img, nhwc(want[f"img_{kind}"]), 1e-3, f"img_{kind}")
  for r in (8, 16, 32, 64, 128):
    got = inter["intermediates"][f"rgb_{r}"][0]
    assert_close_rel(got, nhwc(want[f"{kind}_rgb_{r}"]), 1e-3, f"{kind}_rgb_{r}")


def test_modconv_forms_agree():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 24)) / 12, jnp.float32)
  s = jnp.asarray(rng.standard_normal((3, 16)) + 1, jnp.float32)
  for up in (False, True):
    for demod in (False, True):
      a = stylegan2.modulated_conv2d(x, w, s, demod, up, impl="scale")
      b = stylegan2.modulated_conv2d(x, w, s, demod, up, impl="grouped")
      assert a.shape == b.shape == (3, 16 if up else 8, 16 if up else 8, 24)
      np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.std(b)) + 1e-6)


def test_conv_transpose_phases_match_torch():
  import torch
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
  w = rng.standard_normal((3, 3, 4, 7)).astype(np.float32)
  got = np.asarray(stylegan2.conv_transpose_stride2(jnp.asarray(x), jnp.asarray(w)))
  want = torch.nn.functional.conv_transpose2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2)),
      torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1))), stride=2).numpy()
  np.testing.assert_allclose(got[:, :-1, :-1], nhwc(want), atol=1e-5)
  assert not got[:, -1].any() and not got[:, :, -1].any()


def test_changed_blur_kernel_is_refused(gen):
  _, _, ckpt = gen
  sd = dict(ckpt["g_ema"])
  sd["convs.2.conv.blur.kernel"] = np.ones((4, 4), np.float32) / 4
  with pytest.raises(CheckpointError, match="convs.2.conv.blur.kernel"):
    _convert(sd, ckpt["latent_avg"])


def test_file_checks(gen, tmp_path):
  """A file without latent_avg, or of another size than the config, is refused by name."""
  import torch
  _, _, ckpt = gen
  g_ema = {k: torch.from_numpy(v) for k, v in ckpt["g_ema"].items()}
  torch.save({"g_ema": g_ema}, tmp_path / "no_avg.pt")
  with pytest.raises(CheckpointError, match="no_avg.pt: the file has no 'latent_avg'"):
    registry.convert("generator", str(tmp_path / "no_avg.pt"), config())
  torch.save({"g_ema": g_ema, "latent_avg": torch.zeros(512)}, tmp_path / "g256.pt")
  with pytest.raises(CheckpointError, match=r"a 256px generator, but the model config is for "
                                            r"1024px \(set --config.model.hr_size=256"):
    registry.convert("generator", str(tmp_path / "g256.pt"), config(1024))
