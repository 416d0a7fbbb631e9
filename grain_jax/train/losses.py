"""GRAIN's training losses (coaches/coachTrain.py `calc_loss` and the discriminator steps), and
LOSSES, the table of the generator's loss terms that configs, the training step, the loop
and the benchmark read (a new loss is one row there).

All take NHWC images in [-1, 1] and return scalars averaged over the batch, as the original's
`F.mse_loss`, pSp's LPIPS and IDLoss do. Under data parallelism each device computes the
means of its own shard, and averaging the gradients over devices gives the global mean; the
one loss that couples samples, the relativistic-average GAN loss, takes `axis_name` so that its
batch mean is the mean over all devices.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from grain_jax.eval import metrics
from grain_jax.nets.irse50 import identity_embedding
from grain_jax.nets.layers import resize_bilinear
from grain_jax.nets.lpips import LPIPS


def l2(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared error over all elements (F.mse_loss)."""
  return jnp.mean(jnp.square(a - b))


def lr_l2(lr: jax.Array, target: jax.Array) -> jax.Array:
  """L2 between the LR image and a bilinear resize of the target.

  Training passes the quantized LR (noise added, clamped to [-1, 1]: no gradient where the
  encoder leaves that range), as coachTrain does with `img1`. The resize is torch's
  `F.interpolate(y, size=[16, 16], mode="bilinear")`: two taps, no antialiasing, at the LR
  size of the model.
  """
  return l2(lr, resize_bilinear(target, lr.shape[1:3]))


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 - SSIM (the evaluation's: 11x11 Gaussian window, data range 255), batch mean. Not in
  GRAIN (off by default): a structure term for those who want one beside L2."""
  return 1.0 - jnp.mean(metrics.ssim((a + 1.0) * 127.5, (b + 1.0) * 127.5))


def lpips(lpips_params, a: jax.Array, b: jax.Array) -> jax.Array:
  """LPIPS (AlexNet), averaged over the batch."""
  return jnp.mean(LPIPS().apply(lpips_params, a, b))


def identity(irse50_variables, fake: jax.Array, real: jax.Array) -> jax.Array:
  """1 - cos(embedding(fake), embedding(real)), batch mean; the real side is not differentiated."""
  e_fake = identity_embedding(irse50_variables, fake)
  e_real = jax.lax.stop_gradient(identity_embedding(irse50_variables, real))
  return jnp.mean(1.0 - jnp.sum(e_fake * e_real, axis=-1))


def _batch_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  m = jnp.mean(x, axis=0, keepdims=True)
  return jax.lax.pmean(m, axis_name) if axis_name else m


def _bce_with_logits(logits: jax.Array, target: float) -> jax.Array:
  """nn.BCEWithLogitsLoss (mean) against a constant 0 or 1 target."""
  return jnp.mean(jax.nn.softplus(-logits) if target == 1.0 else jax.nn.softplus(logits))


def relativistic_generator(fake_logits, real_logits, axis_name: str | None = None):
  """Stage-1 generator loss: BCE(D(fake) - mean D(real), 1).

  As the original, only this term (not its real-side twin) drives the generator.
  """
  return _bce_with_logits(fake_logits - _batch_mean(real_logits, axis_name), 1.0)


def relativistic_discriminator(real_logits, fake_logits, axis_name: str | None = None):
  """Stage-1 discriminator loss:
  (BCE(D(real) - mean D(fake), 1) + BCE(D(fake) - mean D(real), 0)) / 2."""
  real_rel = real_logits - _batch_mean(fake_logits, axis_name)
  fake_rel = fake_logits - _batch_mean(real_logits, axis_name)
  return 0.5 * (_bce_with_logits(real_rel, 1.0) + _bce_with_logits(fake_rel, 0.0))


def nonsaturating_generator(fake_logits: jax.Array) -> jax.Array:
  """StyleGAN2 generator loss softplus(-D(fake)), mean."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def logistic_discriminator(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """StyleGAN2 discriminator loss softplus(-D(real)) + softplus(D(fake)), means."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def r1_penalty(logits_fn, real: jax.Array) -> jax.Array:
  """R1: |d sum(D(real)) / d real|^2 per sample, mean over the batch.

  `logits_fn(images) -> logits`. The original weights it by gamma / 2 * interval
  (10 / 2 * 16) and applies it every 16th step (lazy regularisation).
  """
  grad = jax.grad(lambda x: jnp.sum(logits_fn(x)))(real)
  return jnp.mean(jnp.sum(jnp.square(grad).reshape(grad.shape[0], -1), axis=1))


# ------------------------------------------------------------------------------ the table

class LossInputs(NamedTuple):
  """What a generator loss term may read."""
  hr: jax.Array           # the stage's output image
  y: jax.Array            # its target
  outputs: dict           # every output of the forward pass (lr: the quantized LR, ...)
  networks: dict          # loss-network variables ({'lpips': ..., 'irse50': ...})
  adversarial: Callable   # hr -> the stage's adversarial generator loss


@dataclasses.dataclass(frozen=True)
class Loss:
  """One generator loss term: config key loss.<name>, logged as loss_<name>."""
  name: str
  fn: Callable[[LossInputs], jax.Array]
  weight: float | None      # default weight (GRAIN's); None: the stage's (stages.Stage)
  networks: tuple = ()      # loss networks it runs (their weights must be loaded)
  discriminator: bool = False  # needs the stage's discriminator (and its updates)
  always: bool = False      # computed and logged even at weight 0 (the reference metric)
  doc: str = ""


LOSSES = {row.name: row for row in (
    Loss("l2", lambda i: l2(i.hr, i.y), 1.0, always=True,
         doc="mean squared error to the target"),
    Loss("lr_l2", lambda i: lr_l2(i.outputs["lr"], i.y), None,
         doc="the quantized LR against a bilinear resize of the target"),
    Loss("lpips", lambda i: lpips(i.networks["lpips"], i.hr, i.y), 0.8, networks=("lpips",),
         doc="LPIPS (AlexNet)"),
    Loss("id", lambda i: identity(i.networks["irse50"], i.hr, i.y), 0.1,
         networks=("irse50",), doc="1 - cosine of IR-SE50 face embeddings"),
    Loss("adv", lambda i: i.adversarial(i.hr), 0.01, discriminator=True,
         doc="relativistic (stage 1) or non-saturating (stages 2-4) GAN loss"),
    Loss("ssim", lambda i: ssim(i.hr, i.y), 0.0, doc="1 - SSIM (not GRAIN's)"),
)}


def default_weights(stage) -> dict:
  """{loss name: default weight} for a stages.Stage."""
  return {n: (row.weight if row.weight is not None else getattr(stage, n))
          for n, row in LOSSES.items()}


def loss_networks(weights: dict) -> list:
  """The loss networks the terms with a positive weight run."""
  return sorted({n for k, row in LOSSES.items() if weights.get(k, 0) > 0 for n in row.networks})


def uses_discriminator(weights: dict) -> bool:
  """Whether a term with a positive weight needs the stage's discriminator."""
  return any(row.discriminator and weights.get(k, 0) > 0 for k, row in LOSSES.items())
