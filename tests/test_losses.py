"""The training losses against PyTorch formulations of the original's (coachTrain.py) and
closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from conftest import nchw, nhwc
from grain_jax.train import losses

RNG = np.random.default_rng(0)


def _t(a):
  return torch.from_numpy(np.asarray(a, np.float64))


def test_l2_and_lr_l2_match_torch():
  y = RNG.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  hr = RNG.uniform(-1, 1, y.shape).astype(np.float32)
  lr = RNG.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  want = F.mse_loss(_t(nchw(hr)), _t(nchw(y))).item()
  assert abs(float(losses.l2(hr, y)) - want) < 1e-6
  gt = F.interpolate(_t(nchw(y)), size=[4, 4], mode="bilinear")
  want = F.mse_loss(_t(nchw(lr)), gt).item()
  assert abs(float(losses.lr_l2(lr, y)) - want) < 1e-6


def test_relativistic_losses_match_the_originals_bce_form():
  real = RNG.normal(size=(3, 4, 4, 1)).astype(np.float32)
  fake = RNG.normal(size=(3, 4, 4, 1)).astype(np.float32)
  r, f = _t(nchw(real)), _t(nchw(fake))
  bce = torch.nn.BCEWithLogitsLoss()
  ones, zeros = torch.ones_like(r), torch.zeros_like(r)
  want_g = bce(f - r.mean(0, keepdim=True), ones).item()
  want_d = ((bce(r - f.mean(0, keepdim=True), ones)
             + bce(f - r.mean(0, keepdim=True), zeros)) / 2).item()
  assert abs(float(losses.relativistic_generator(fake, real)) - want_g) < 1e-6
  assert abs(float(losses.relativistic_discriminator(real, fake)) - want_d) < 1e-6


def test_relativistic_batch_mean_spans_devices():
  """Under shard_map the batch mean is over all devices: 1 shard == the whole batch."""
  from jax.sharding import Mesh, PartitionSpec as P
  real = RNG.normal(size=(4, 2, 2, 1)).astype(np.float32)
  fake = RNG.normal(size=(4, 2, 2, 1)).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  f = jax.shard_map(lambda r, f: jax.lax.pmean(losses.relativistic_discriminator(r, f, "data"),
                                               "data"),
                    mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  assert abs(float(f(real, fake)) - float(losses.relativistic_discriminator(real, fake))) < 1e-7


def test_stylegan2_losses_match_torch():
  real = RNG.normal(size=(5, 1)).astype(np.float32)
  fake = RNG.normal(size=(5, 1)).astype(np.float32)
  want_g = F.softplus(-_t(fake)).mean().item()
  want_d = (F.softplus(-_t(real)).mean() + F.softplus(_t(fake)).mean()).item()
  assert abs(float(losses.nonsaturating_generator(fake)) - want_g) < 1e-6
  assert abs(float(losses.logistic_discriminator(real, fake)) - want_d) < 1e-6


def test_r1_penalty_matches_torch_autograd():
  w = RNG.normal(size=(8, 8, 3)).astype(np.float32)
  x = RNG.normal(size=(2, 8, 8, 3)).astype(np.float32)

  def d_jax(img):  # a nonlinear "discriminator" with one logit per image
    return jnp.sum(jnp.tanh(img * w) ** 2, axis=(1, 2, 3))[:, None]

  xt = _t(nchw(x)).requires_grad_(True)
  logits = (torch.tanh(xt * _t(nchw(w[None]))) ** 2).sum((1, 2, 3))
  grad, = torch.autograd.grad(logits.sum(), xt, create_graph=True)
  want = grad.pow(2).reshape(2, -1).sum(1).mean().item()  # the original's d_r1_loss
  got = float(losses.r1_penalty(d_jax, x))
  assert abs(got - want) <= 1e-5 * abs(want)


def test_identity_loss_is_one_minus_cosine_of_the_cropped_embeddings(torch_ckpt):
  from grain_jax.nets import irse50, registry
  variables = registry.convert("irse50", torch_ckpt("irse50_112"), None)[0]
  y = RNG.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  fake = np.clip(y + RNG.normal(0, 0.3, y.shape), -1, 1).astype(np.float32)
  # Independent path: torch bilinear to 256, the fixed crop, torch adaptive pooling, then
  # the network (tested against the original elsewhere) on the 112 crops.
  def emb(a):
    t = F.interpolate(_t(nchw(a)), size=[256, 256], mode="bilinear")[:, :, 35:223, 32:220]
    crop = nhwc(F.adaptive_avg_pool2d(t, (112, 112)).numpy()).astype(np.float32)
    return np.asarray(irse50.IRSE50().apply(variables, crop), np.float64)
  want = np.mean(1.0 - np.sum(emb(fake) * emb(y), axis=1))
  got = float(losses.identity(variables, fake, y))
  assert abs(got - want) < 1e-5
  # Only the generated image is differentiated, as the original detaches the target's features.
  g_real = jax.grad(lambda r: losses.identity(variables, fake, r))(y)
  g_fake = jax.grad(lambda f: losses.identity(variables, f, y))(fake)
  assert float(jnp.abs(g_real).max()) == 0.0 and float(jnp.abs(g_fake).max()) > 0.0


def test_ssim_loss_is_one_minus_the_evaluation_ssim_and_has_a_gradient():
  import skimage.metrics
  from grain_jax.train import losses

  rng = np.random.default_rng(4)
  y = rng.uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  x = np.clip(y + rng.normal(0, 0.2, y.shape), -1, 1).astype(np.float32)
  want = np.mean([skimage.metrics.structural_similarity(
      (a + 1) * 127.5, (b + 1) * 127.5, channel_axis=-1, data_range=255, gaussian_weights=True,
      sigma=1.5, use_sample_covariance=False) for a, b in zip(x, y)])
  assert abs(float(losses.ssim(x, y)) - (1 - want)) < 1e-5
  assert float(losses.ssim(y, y)) < 1e-6
  g = jax.grad(lambda a: losses.ssim(a, y))(x)
  # A small step against the gradient raises SSIM.
  assert float(losses.ssim(x - 0.05 * g / np.abs(g).max(), y)) < float(losses.ssim(x, y))
