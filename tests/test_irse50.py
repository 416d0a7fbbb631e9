"""IR-SE50 (GRAIN's identity net): parity with the original on synthetic weights, and the IDLoss
preprocessing (crop + adaptive pooling, bilinear resize) against torch."""
import jax
import numpy as np
import pytest

from conftest import assert_close_rel, nchw, nhwc, ref
from grain_jax.nets import irse50, registry
from grain_jax.nets.torch_import import load_torch_file

CASE = "irse50_112"
# (name in outputs.npz, Flax submodule name): forward hooks on input_layer / body[i] in the original.
HOOKS = [("input_layer", "input_layer"), ("body2", "body_2"), ("body6", "body_6"),
         ("body20", "body_20"), ("body23", "body_23")]


@pytest.fixture(scope="module")
def state_dict(torch_ckpt):
  return load_torch_file(torch_ckpt(CASE))


@pytest.fixture(scope="module")
def run(state_dict):
  """Embedding and captured intermediates of our port on the case's input."""
  variables = registry.from_state_dict("irse50", state_dict, None)
  model = irse50.IRSE50()
  wanted = {name for _, name in HOOKS} | {"output_layer"}

  def only_hooks(mdl, method):
    return method == "__call__" and mdl.name in wanted

  x = nhwc(ref(CASE, "inputs.npz")["x"])
  emb, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=only_hooks))(
      variables, x)
  inter = {k: np.asarray(v["__call__"][0]) for k, v in state["intermediates"].items()}
  return np.asarray(emb), inter


def test_embedding_matches_original(run):
  emb, inter = run
  want = ref(CASE)
  # Target max|err| <= 1e-4 * RMS; the reference's own fp32 noise is ~2e-7 (RMS 0.044).
  assert_close_rel(emb, want["embedding"], 1e-4, "embedding")
  assert_close_rel(inter["output_layer"], want["pre_l2norm"], 1e-4, "pre_l2norm")
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("hook,name", HOOKS)
def test_intermediates_match_original(run, hook, name):
  _, inter = run
  want = ref(CASE)
  got = nchw(inter[name]).astype(np.float64)
  if hook in want.files:  # Full tensors are stored for the small maps only.
    assert_close_rel(got, want[hook], 1e-4, hook)
  assert_close_rel(got.mean(axis=(2, 3)), want[hook + "_chmean"], 1e-4, hook + "_chmean")
  assert_close_rel(got.std(axis=(2, 3)), want[hook + "_chstd"], 1e-4, hook + "_chstd")


def test_adaptive_pool_matrix_overlaps():
  m = irse50.adaptive_avg_pool_matrix(188, 112)
  np.testing.assert_allclose(m.sum(axis=1), 1.0)
  taps = (m > 0).sum(axis=1)
  assert set(taps) == {2, 3}  # Windows of 2 or 3 pixels, some overlapping.
  assert ((m > 0).sum(axis=0) > 1).any()


def test_identity_crop_matches_torch():
  import torch
  import torch.nn.functional as F

  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32)
  want = F.adaptive_avg_pool2d(torch.from_numpy(x)[:, :, 35:223, 32:220], (112, 112)).numpy()
  got = np.asarray(irse50.identity_crop(nhwc(x)))
  assert got.shape == (2, 112, 112, 3)
  np.testing.assert_allclose(nchw(got), want, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="256x256"):
    irse50.identity_crop(nhwc(x)[:, :128, :128])
