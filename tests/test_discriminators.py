"""Discriminators: StyleGAN2 parity with rosinality's reference outputs, the patch discriminator
against a PyTorch re-implementation of GRAIN's, and what their converters check beyond keys and
shapes (FIR buffers, key forms; test_networks.py checks keys and shapes for every network)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close_rel, nchw, nhwc, ref
from grain_jax.nets import discriminators as D
from grain_jax.nets import registry
from grain_jax.nets.model_config import grain_1024
from grain_jax.nets.stylegan2 import default_channels
from grain_jax.nets.torch_import import CheckpointError, load_torch_file

CASE = "stylegan2_disc_256"
SIZE = 256
CHANNELS = default_channels(SIZE, 2)


def config(hr_size=1024, patch_widths=(64, 128, 256, 512)):
  cfg = grain_1024()
  cfg.hr_size = hr_size
  cfg.patch_discriminator.widths = patch_widths
  return cfg


def _convert(sd):
  return registry.from_state_dict("discriminator", sd, config(SIZE))


def _convert_patch(sd, widths=(64, 128, 256, 512)):
  return registry.from_state_dict("patch_discriminator", sd, config(patch_widths=widths))


# ----------------------------------------------------------------------------------------------
# StyleGAN2 discriminator against the original's outputs.


@pytest.fixture(scope="module")
def disc_sd(torch_ckpt):
  return load_torch_file(torch_ckpt(CASE))["d"]


@pytest.fixture(scope="module")
def disc(disc_sd):
  model = registry.build("discriminator", config(SIZE))
  assert tuple(model.channels) == CHANNELS
  variables = _convert(disc_sd)
  apply = jax.jit(lambda v, x: model.apply(v, x, return_intermediates=True))
  return variables, apply


def _summaries(a):
  """The reference summaries of an NHWC map, computed in float64 (NCHW like the references)."""
  a = nchw(a).astype(np.float64)
  n, c, r, _ = a.shape
  k = r // 8
  return {"pool8": a.reshape(n, c, 8, k, 8, k).mean(axis=(3, 5)),
          "chmean": a.mean(axis=(2, 3)), "chstd": a.std(axis=(2, 3)),
          "crop8": a[:, :16, :8, :8]}


@pytest.fixture(scope="module")
def batch4(disc):
  """One batch-4 run: logits, full small intermediates, summaries of the large ones."""
  variables, apply = disc
  x = nhwc(ref(CASE, "inputs.npz")["x"])
  logits, inter = apply(variables, x)
  out = {"logits": np.asarray(logits)}
  for name, a in inter.items():
    a = np.asarray(a)
    if name == "final_linear0":
      out[name] = a
    elif a.shape[1] >= 32:
      for s, v in _summaries(a).items():
        out[f"{name}_{s}"] = v
    else:
      out[name] = nchw(a)
  return out


def test_logits_batch4(batch4):
  want = ref(CASE)["logits"]
  assert batch4["logits"].shape == (4, 1)
  # Absolute: the logits only spread 8e-3 around 0.64 (fp64 vs fp32 of the original: 1.5e-6).
  np.testing.assert_allclose(batch4["logits"], want, rtol=0, atol=1e-5)


def test_logits_each_alone(disc):
  """Batch 1: group 1, the stddev channel is sqrt(1e-8) (differs from the batch-4 logits)."""
  variables, apply = disc
  x = nhwc(ref(CASE, "inputs.npz")["x"])
  got = np.concatenate([np.asarray(apply(variables, x[n:n + 1])[0]) for n in range(4)])
  np.testing.assert_allclose(got, ref(CASE)["logits_each_alone"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["resblock4", "resblock5", "resblock6", "final_conv",
                                  "final_linear0"])
def test_intermediates(batch4, name):
  assert_close_rel(batch4[name], ref(CASE)[name], 1e-3, name)


@pytest.mark.parametrize("name", ["convs0", "resblock1", "resblock2", "resblock3"])
@pytest.mark.parametrize("summary", ["pool8", "chmean", "chstd", "crop8"])
def test_intermediate_summaries(batch4, name, summary):
  key = f"{name}_{summary}"
  assert_close_rel(batch4[key], ref(CASE)[key], 1e-3, key)


# ----------------------------------------------------------------------------------------------
# Converter checks beyond keys and shapes.


def test_modified_blur_kernel(disc_sd):
  sd = dict(disc_sd)
  k = np.array([1, 2, 1], np.float32)
  sd["convs.2.skip.0.kernel"] = np.outer(k, k) / 16
  with pytest.raises(CheckpointError, match=r"convs\.2\.skip\.0\.kernel: FIR kernel differs"):
    _convert(sd)
  sd = dict(disc_sd)
  sd["convs.5.conv2.0.kernel"] = sd["convs.5.conv2.0.kernel"] * 1.01
  with pytest.raises(CheckpointError, match=r"convs\.5\.conv2\.0\.kernel"):
    _convert(sd)


# ----------------------------------------------------------------------------------------------
# Minibatch stddev and small configurations.


def _torch_stddev(x, group_size, feat):
  """The original's minibatch-stddev code path, in torch (NCHW)."""
  n, c, h, w = x.shape
  group = min(n, group_size)
  s = x.view(group, -1, feat, c // feat, h, w)
  s = torch.sqrt(s.var(0, unbiased=False) + 1e-8)
  s = s.mean([2, 3, 4], keepdim=True).squeeze(2)
  s = s.repeat(group, 1, h, w)
  return torch.cat([x, s], 1)


@pytest.mark.parametrize("n,group,feat", [(8, 4, 1), (8, 4, 2), (3, 4, 1), (6, 2, 3), (1, 4, 1)])
def test_minibatch_stddev_matches_torch(n, group, feat):
  x = np.random.default_rng(n * 100 + group * 10 + feat).standard_normal((n, 6, 5, 5))
  x = x.astype(np.float32)
  want = _torch_stddev(torch.from_numpy(x), group, feat).numpy()
  got = nchw(D.minibatch_stddev(jnp.asarray(nhwc(x)), group, feat))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _random_variables(model, x, seed=0):
  """Random N(0, 1) variables of the model's shapes (eval_shape: no slow init compile)."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                abstract)


def test_batch_not_divisible_by_group(disc):
  variables, apply = disc
  with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the stddev group"):
    apply(variables, jnp.zeros((6, SIZE, SIZE, 3)))  # Raised while tracing.


def test_small_configuration_groups():
  """size 8: batch 8 = 2 stddev groups of 4 (sample n grouped with n % 2); batch 3 = 1 group."""
  model = D.StyleGAN2Discriminator(8, (8, 8))
  x = np.random.default_rng(3).standard_normal((8, 8, 8, 3)).astype(np.float32)
  v = _random_variables(model, x)
  apply = jax.jit(model.apply)
  out = apply(v, x)
  assert out.shape == (8, 1)
  # The groups are {0, 2, 4, 6} and {1, 3, 5, 7}: evaluating one group alone gives the same,
  # another set of 4 samples does not.
  np.testing.assert_allclose(apply(v, x[0::2]), out[0::2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(apply(v, x[:4]), out[:4], rtol=1e-5, atol=1e-6)


def test_channels_and_size_checked():
  with pytest.raises(ValueError, match="one width per resolution"):
    D.StyleGAN2Discriminator(16, (8, 8)).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="expected"):
    D.StyleGAN2Discriminator(8, (8, 8)).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  assert default_channels(1024, 2) == (512, 512, 512, 512, 512, 256, 128, 64, 32)


# ----------------------------------------------------------------------------------------------
# Patch discriminator (GRAIN models/invRRDB.py: Discriminator) against a torch re-implementation.


class TorchPatchDiscriminator(nn.Module):
  """The layer list of GRAIN's stage-1 discriminator, same state-dict keys (model.N.*)."""

  def __init__(self, widths=(64, 128, 256, 512)):
    super().__init__()
    layers, cin = [], 3
    for i, w in enumerate(widths):
      layers.append(nn.Conv2d(cin, w, 3, 1, 1))
      if i > 0:
        layers.append(nn.BatchNorm2d(w))
      layers += [nn.LeakyReLU(0.2), nn.Conv2d(w, w, 3, 2, 1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
      cin = w
    layers.append(nn.Conv2d(cin, 1, 3, 1, 1))
    self.model = nn.Sequential(*layers)

  def forward(self, x):
    return self.model(x)


def _torch_patch_d(widths, seed):
  torch.manual_seed(seed)
  net = TorchPatchDiscriminator(widths)
  with torch.no_grad():  # Non-trivial BatchNorm affine and running statistics.
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
  return net


def _torch_state(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def patch_setup():
  net = _torch_patch_d((64, 128, 256, 512), seed=0)
  x = np.random.default_rng(7).uniform(-1, 1, (2, 3, 1024, 1024)).astype(np.float32)
  variables = _convert_patch(_torch_state(net))
  return net, x, variables


def test_patch_discriminator_eval(patch_setup):
  net, x, variables = patch_setup
  net.eval()
  with torch.no_grad():
    want = net(F.interpolate(torch.from_numpy(x), size=[256, 256], mode="bilinear")).numpy()
  got = jax.jit(lambda v, x: D.PatchDiscriminator().apply(v, x, train=False))(variables, nhwc(x))
  assert got.shape == (2, 16, 16, 1)
  assert_close_rel(nchw(got), want, 1e-4, "patch D eval")


def test_patch_discriminator_train(patch_setup):
  """Batch statistics, and the running statistics torch would store (unbiased variance)."""
  net, x, variables = patch_setup
  net.train()
  with torch.no_grad():
    want = net(F.interpolate(torch.from_numpy(x), size=[256, 256], mode="bilinear")).numpy()
  want_stats = _convert_patch(_torch_state(net))["batch_stats"]
  fn = jax.jit(lambda v, x: D.PatchDiscriminator().apply(v, x, train=True,
                                                         mutable=["batch_stats"]))
  got, new = fn(variables, nhwc(x))
  assert_close_rel(nchw(got), want, 1e-4, "patch D train")
  for name, stats in want_stats.items():
    for k in ("mean", "var"):
      assert_close_rel(new["batch_stats"][name][k], stats[k], 1e-5, f"{name}/{k}")


def test_patch_discriminator_input_gradient():
  """Gradient through the resize and the batch statistics (training mode), small widths."""
  widths = (8, 16, 16, 32)
  net = _torch_patch_d(widths, seed=1).train()
  x = np.random.default_rng(8).uniform(-1, 1, (2, 3, 48, 48)).astype(np.float32)
  xt = torch.from_numpy(x).requires_grad_(True)
  out = net(F.interpolate(xt, size=[64, 64], mode="bilinear"))
  (out ** 2).sum().backward()
  variables = _convert_patch(_torch_state(net), widths)
  model = D.PatchDiscriminator(widths, input_size=64)

  def loss(x):
    y, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y ** 2)

  g = jax.jit(jax.grad(loss))(jnp.asarray(nhwc(x)))
  assert_close_rel(nchw(g), xt.grad.numpy(), 1e-4, "input gradient")


def test_patch_converter_key_forms_and_errors():
  widths = (8, 16, 16, 32)
  sd = _torch_state(_torch_patch_d(widths, seed=2))
  a = _convert_patch(sd, widths)
  # GRAIN's own loader expects the keys without "model." (it loads into dis.model).
  b = _convert_patch({k[len("model."):]: v for k, v in sd.items()}, widths)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(a["params"]["block1_conv2"]["conv"]["kernel"],
                                np.transpose(sd["model.8.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(a["batch_stats"]["block3_bn2"]["var"], sd["model.21.running_var"])
  bad = dict(sd)
  del bad["model.12.running_mean"]
  with pytest.raises(CheckpointError, match=r"model\.12\.running_mean"):
    _convert_patch(bad, widths)
  with pytest.raises(CheckpointError, match="shape"):
    _convert_patch(sd, (8, 16, 32, 32))


def test_patch_discriminator_file_converts(tmp_path):
  """A stage-1 `*_dis.pt` as GRAIN's trainer saves it -> grain-jax convert -> same variables."""
  from conftest import convert_cli
  from grain_jax.formats.weights import load_weights

  net = _torch_patch_d((64, 128, 256, 512), seed=3)
  torch.save({"state_dict": net.state_dict()}, tmp_path / "best_model_dis.pt")
  r = convert_cli(tmp_path / "w", "--patch_discriminator", tmp_path / "best_model_dis.pt")
  assert r.returncode == 0, r.stderr
  tree, _, meta = load_weights(str(tmp_path / "w"))
  assert meta["networks"] == ["patch_discriminator"]
  want = _convert_patch(_torch_state(net))
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree["patch_discriminator"], want)
