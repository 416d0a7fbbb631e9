"""Optimizers: Ranger (RAdam + Lookahead + gradient centralization), as GRAIN trains, and Adam.

Ranger here is the RAdam of lessw2020's Ranger (pSp's copy, which GRAIN trains with), written
as an optax transform, behind gradient centralization and inside optax's `lookahead`. It is
not optax's `radam`, which differs in two places that matter for step-by-step parity:
optax adds eps to sqrt of the bias-corrected second moment, Ranger to sqrt of the raw one
(eps / sqrt(1 - b2^t) instead of eps: 30x larger at step 1), and optax rectifies from
rho_t >= 5, Ranger from rho_t > 5.

Parameters of a Ranger state are `optax.LookaheadParams` (fast, slow); the networks run with
the fast ones (as PyTorch's Ranger, whose `p.data` are the fast weights). `model_params`
returns them for either optimizer, unpacked where the train state packs them (packed.py);
`optimizer_gradients` centralizes and packs their gradients for an optimizer made with
`prepared=True`. `learning_rate_schedule` is the configs' lr_schedule.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from grain_jax.train import packed


def centralize(grads):
  """Gradient centralization of a tree: from each kernel gradient (rank > 1), its mean over
  every axis but the output one subtracted; vectors (biases, scales) left alone.

  PyTorch weights are (out, in, kh, kw) / (out, in) and Ranger averages over axes 1..; Flax
  kernels are HWIO / (in, out), so the output axis is the last and the mean is over all the
  others.
  """
  def gc(g):
    if g.ndim > 1:
      return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)
    return g
  return jax.tree_util.tree_map(gc, grads)


def centralize_gradients() -> optax.GradientTransformation:
  """`centralize` as an optax transform, on per-tensor updates. Packed gradients are
  centralized before packing (`optimizer_gradients`): in a packed vector the tensors'
  shapes are gone, so they are refused here rather than silently left as they are."""
  def update(updates, state, params=None):
    del params
    if packed.is_packed(updates):
      raise TypeError("gradient centralization needs per-tensor updates: use "
                      "optim.optimizer_gradients and make_optimizer(..., prepared=True)")
    return centralize(updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class RangerRAdamState(NamedTuple):
  count: jax.Array  # int32: steps taken
  mu: optax.Updates
  nu: optax.Updates


def _rho(t: jax.Array, b2: float) -> jax.Array:
  """RAdam's rho_t = rho_inf - 2 t b2^t / (1 - b2^t) in float32, without the cancellation of
  the direct form (two ~2000-sized terms for rho ~ t at small t, where Ranger's step size
  depends on rho - 4): with c = -log(b2), rho_t = (rho_inf - 2/c) + t * (1 - x/6 + x^3/360
  - x^5/15120 + x^7/604800) for x = t c < 0.5 (2 t / expm1(x)'s series), the direct form
  above. Constants in float64 on the host."""
  c = -math.log1p(-(1.0 - b2))
  rho_inf = 2.0 / (1.0 - b2) - 1.0
  t = t.astype(jnp.float32)
  x = t * c
  x2 = x * x
  series = (rho_inf - 2.0 / c) + t * (1.0 - x / 6.0 + x * x2 / 360.0 - x * x2 * x2 / 15120.0
                                      + x * x2 * x2 * x2 / 604800.0)
  direct = rho_inf - 2.0 * t / jnp.expm1(x)
  return jnp.where(x < 0.5, series, direct)


def scale_by_ranger_radam(b1: float = 0.95, b2: float = 0.999, eps: float = 1e-5,
                          threshold: float = 5.0) -> optax.GradientTransformation:
  """Ranger's RAdam direction (before the learning rate): for rho_t > threshold
  r_t / (1 - b1^t) * m / (sqrt(v) + eps) with the rectification r_t, else m / (1 - b1^t).
  The bias corrections 1 - b^t are computed as -expm1(t log b), accurate in float32."""
  log_b1, log_b2 = math.log(b1), math.log1p(-(1.0 - b2))
  rho_inf = 2.0 / (1.0 - b2) - 1.0

  def init(params):
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
    return RangerRAdamState(jnp.zeros((), jnp.int32), zeros(), zeros())

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    t = count.astype(jnp.float32)
    bc1, bc2 = -jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2)
    rho = _rho(count, b2)
    rectified = rho > threshold
    safe = jnp.where(rectified, rho, threshold + 1.0)  # keeps the unused branch finite
    step = jnp.sqrt(bc2 * (safe - 4) / (rho_inf - 4) * (safe - 2) / safe
                    * rho_inf / (rho_inf - 2)) / bc1
    out = jax.tree_util.tree_map(
        lambda m, v: jnp.where(rectified, step * m / (jnp.sqrt(v) + eps), m / bc1), mu, nu)
    return out, RangerRAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def ranger(learning_rate, b1: float = 0.95, b2: float = 0.999, eps: float = 1e-5,
           sync_period: int = 6, slow_step_size: float = 0.5,
           gradient_centralization: bool = True) -> optax.GradientTransformation:
  """Ranger with GRAIN's settings (pSp's Ranger defaults); params are LookaheadParams.
  gradient_centralization=False: for gradients centralized already (optimizer_gradients)."""
  fast = optax.chain(*([centralize_gradients()] if gradient_centralization else []),
                     scale_by_ranger_radam(b1, b2, eps),
                     optax.scale_by_learning_rate(learning_rate))
  return optax.lookahead(fast, sync_period=sync_period, slow_step_size=slow_step_size)


def learning_rate_schedule(cfg, base_lr: float, schedule_steps=None) -> optax.Schedule:
  """cfg.lr_schedule ('constant', or 'cosine' to 0 at `schedule_steps`, default max_steps)
  after cfg.warmup_steps of linear warmup. `schedule_steps` may be a traced value (the
  train state's), so a time budget can set it after the run started."""
  if cfg.lr_schedule not in ("constant", "cosine"):
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
  warmup = int(cfg.warmup_steps)
  total = cfg.max_steps if schedule_steps is None else schedule_steps

  def schedule(count):
    if cfg.lr_schedule == "constant":
      lr = jnp.full((), base_lr, jnp.float32)
    else:  # optax.cosine_decay_schedule's formula, with a decay length that may be traced
      decay = jnp.maximum(total - warmup, 1).astype(jnp.float32)
      t = jnp.minimum(jnp.maximum(count - warmup, 0).astype(jnp.float32), decay)
      lr = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t / decay))
    if warmup:
      lr = jnp.where(count < warmup, base_lr * count.astype(jnp.float32) / warmup, lr)
    return lr

  return schedule


def make_optimizer(cfg, learning_rate, prepared: bool = False) -> optax.GradientTransformation:
  """From an optimizer config: name 'ranger' (GRAIN's default) or 'adam'. prepared=True: it
  takes gradients from `optimizer_gradients` (as the train step does)."""
  if cfg.name == "ranger":
    return ranger(learning_rate, cfg.b1, cfg.b2, cfg.eps, cfg.sync_period, cfg.slow_step_size,
                  gradient_centralization=not prepared)
  if cfg.name == "adam":  # torch.optim.Adam's defaults, as the original's --optim_name adam
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
  raise ValueError(f"unknown optimizer {cfg.name!r} (choose 'ranger' or 'adam')")


def wrap_params(cfg, params):
  """The optimizer's view of `params` (a tree, or a packed.PackedTree): LookaheadParams for
  Ranger, `params` itself for Adam."""
  return optax.LookaheadParams.init_synced(params) if cfg.name == "ranger" else params


def _run_view(opt_params):
  return opt_params.fast if isinstance(opt_params, optax.LookaheadParams) else opt_params


def model_params(opt_params):
  """The parameters the networks run with (Ranger: the fast weights), as a tree (unpacked)."""
  return packed.maybe_unpack(_run_view(opt_params))


def optimizer_gradients(cfg, opt_params, grads):
  """Gradients with respect to model_params(opt_params) (a tree) as
  `make_optimizer(cfg, ..., prepared=True)` takes them: Ranger's gradient centralization
  done here, per tensor, then packed where the parameters are. (On the packed vector it
  would take a slice and a concatenation per tensor: ~10 s more compilation for stage 4 on
  XLA:CPU.) Centralization is linear, so doing it before the gradients are averaged over
  devices rather than after changes only float rounding."""
  if cfg.name == "ranger":
    grads = centralize(grads)
  return packed.pack_as(_run_view(opt_params), grads)
