"""The train state: everything a training step changes, as one pytree (what checkpoints
hold), how a run's first state is made, and the finiteness checks of the divergence guard.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.train import optim, packed, stages
from grain_jax.util import distributed


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes, as one pytree (what checkpoints hold)."""
  step: jax.Array
  # The trained networks' params and the discriminator's, in the optimizer's view
  # (optim.wrap_params) of their packed form (packed.py), as are the optimizer states.
  params: Any
  opt_state: Any
  frozen: Any          # {'params': {network: ...}, 'buffers': ...}: networks not trained
  d_params: Any
  d_opt_state: Any
  d_batch_stats: Any   # patch discriminator BatchNorm statistics ({} for StyleGAN2's D)
  rng: jax.Array       # raw uint32 key data (checkpointable)
  nonfinite_run: jax.Array    # consecutive steps skipped for a non-finite loss or state
  nonfinite_total: jax.Array  # all steps skipped so far
  # The learning-rate schedule's length (max_steps, or what a time budget decided once the
  # step time was measured): a value, not a constant of the compiled step, so setting it
  # needs no recompilation.
  schedule_steps: jax.Array

  def learned(self) -> tuple:
    """What training changes and may turn non-finite: parameters, optimizer and
    discriminator states."""
    return self.params, self.opt_state, self.d_params, self.d_opt_state, self.d_batch_stats


def variables_of(state: TrainState) -> dict:
  """The GRAIN model's variables (trained + frozen, including networks the stage does not run)."""
  params = dict(state.frozen["params"])
  params.update(optim.model_params(state.params))
  return {"params": params, "buffers": state.frozen.get("buffers", {})}




def create_train_state(cfg, variables, d_variables, tx, d_tx) -> TrainState:
  """The initial state from the model's variables and the discriminator's (`tx`, `d_tx`:
  their optimizers, for the state's structure). Trained parameters are packed (packed.py);
  `packed.unpack_all` gives the same state per tensor (what checkpoints hold)."""
  stage = stages.get(cfg.stage)
  params = variables["params"]
  trained = {n: params[n] for n in stage.trains}
  frozen = {"params": {n: p for n, p in params.items() if n not in stage.trains},
            "buffers": variables.get("buffers", {})}
  wrapped = optim.wrap_params(cfg.optimizer, packed.pack(trained))
  d_wrapped = optim.wrap_params(cfg.optimizer, packed.pack(d_variables["params"]))
  # Copies: Lookahead's fast and slow start as the same arrays, and the step donates both.
  as_jnp = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)
  wrapped, d_wrapped = as_jnp(wrapped), as_jnp(d_wrapped)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=wrapped, opt_state=tx.init(wrapped),
      frozen=as_jnp(frozen), d_params=d_wrapped, d_opt_state=d_tx.init(d_wrapped),
      d_batch_stats=as_jnp(d_variables.get("batch_stats", {})),
      rng=jax.random.key_data(jax.random.key(cfg.seed)),
      nonfinite_run=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
      schedule_steps=jnp.asarray(cfg.max_steps, jnp.int32))


def floating_leaves(tree) -> list:
  """The floating-point leaves of `tree` (the ones that can hold a NaN or infinity)."""
  return [a for a in jax.tree_util.tree_leaves(tree)
          if jax.dtypes.issubdtype(jnp.asarray(a).dtype, jnp.inexact)]


# Elements per finiteness check of all_finite: small leaves are checked together, flattened
# and concatenated up to this many (16 MB of float32).
FINITE_CHECK_ELEMENTS = 2 ** 22


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value of `tree` is finite (a boolean scalar).

  One reduction per leaf makes XLA compile for minutes: a state per tensor has thousands of
  leaves (Ranger holds 5 copies of InvRRDB's 718), each a reduction to compile. So leaves of a dtype
  are flattened and concatenated into groups of up to FINITE_CHECK_ELEMENTS, one reduction
  per group; a larger leaf is its own.
  """
  groups, pending = [], {}
  for a in floating_leaves(tree):
    a = jnp.ravel(a)
    if a.size >= FINITE_CHECK_ELEMENTS:
      groups.append([a])
      continue
    group = pending.setdefault(a.dtype, [])
    if sum(b.size for b in group) + a.size > FINITE_CHECK_ELEMENTS:
      groups.append(pending.pop(a.dtype))
      group = pending.setdefault(a.dtype, [])
    group.append(a)
  groups += pending.values()
  checks = [jnp.all(jnp.isfinite(jnp.concatenate(g) if len(g) > 1 else g[0])) for g in groups]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def state_is_finite(state: TrainState) -> bool:
  """Whether the state's parameters, frozen networks, optimizer and discriminator states are
  all finite. Checked on the host, leaf by leaf: made once per run, it is not worth a
  compilation."""
  return all(np.isfinite(distributed.host_copy(a)).all()
             for a in floating_leaves((state.learned(), state.frozen)))
