"""Optimizers: Ranger (RAdam + Lookahead + gradient centralization), as GRAIN trains, and Adam.

Ranger here is optax's `radam` wrapped in optax's `lookahead`, with gradient centralization in
front. Differences from the PyTorch Ranger GRAIN uses (lessw2020, via pSp), both negligible
beyond the first steps: optax adds eps to sqrt of the bias-corrected second moment, Ranger to
sqrt of the raw one (an eps / sqrt(1 - b2^t) instead of eps); and optax switches to the
adaptive step when rho_t >= 5, Ranger when rho_t > 5.

Parameters of a Ranger state are `optax.LookaheadParams` (fast, slow); the networks run with
the fast ones (as PyTorch's Ranger, whose `p.data` are the fast weights). `model_params`
returns them for either optimizer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def centralize_gradients() -> optax.GradientTransformation:
  """Gradient centralization: subtract from each kernel gradient its mean over every axis but
  the output one.

  PyTorch weights are (out, in, kh, kw) / (out, in) and Ranger averages over axes 1..; Flax
  kernels are HWIO / (in, out), so the output axis is the last and the mean is over all the
  others. Vectors (biases, scales) are left alone.
  """
  def update(updates, state, params=None):
    del params
    def gc(g):
      if g.ndim > 1:
        return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)
      return g
    return jax.tree_util.tree_map(gc, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def ranger(learning_rate, b1: float = 0.95, b2: float = 0.999, eps: float = 1e-5,
           sync_period: int = 6, slow_step_size: float = 0.5) -> optax.GradientTransformation:
  """Ranger with GRAIN's settings (pSp's Ranger defaults); params are LookaheadParams."""
  fast = optax.chain(centralize_gradients(),
                     optax.radam(learning_rate, b1=b1, b2=b2, eps=eps, threshold=5.0))
  return optax.lookahead(fast, sync_period=sync_period, slow_step_size=slow_step_size)


def make_optimizer(cfg, learning_rate) -> optax.GradientTransformation:
  """From an optimizer config: name 'ranger' (GRAIN's default) or 'adam'."""
  if cfg.name == "ranger":
    return ranger(learning_rate, cfg.b1, cfg.b2, cfg.eps, cfg.sync_period, cfg.slow_step_size)
  if cfg.name == "adam":  # torch.optim.Adam's defaults, as the original's --optim_name adam
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
  raise ValueError(f"unknown optimizer {cfg.name!r} (choose 'ranger' or 'adam')")


def wrap_params(cfg, params):
  """The optimizer's view of `params`: LookaheadParams for Ranger, the tree itself for Adam."""
  return optax.LookaheadParams.init_synced(params) if cfg.name == "ranger" else params


def model_params(opt_params):
  """The parameters the networks run with (Ranger: the fast weights)."""
  return opt_params.fast if isinstance(opt_params, optax.LookaheadParams) else opt_params
