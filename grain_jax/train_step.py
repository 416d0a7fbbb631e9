"""The train state and one jitted, data-parallel training step of a GRAIN stage (stages.py).

A step is written per device, in the pmap style: it sees its shard of the global batch,
averages gradients (and the batch statistics that couple samples) with `lax.pmean` over the
"data" axis, and leaves every replica with the same new state. `make_parallel_step` runs it
over all devices with `jax.shard_map` under `jax.jit` on a ("data",) mesh; `create_training`
builds the state and that step for a config (what the trainer, the benchmark and the tests
use).

Each step follows coaches/coachTrain.py:
  1. every `d_every`-th step (step % d_every == 0) the discriminator is updated first, on a
     fresh forward pass: relativistic-average BCE with the patch discriminator in stage 1,
     the logistic loss in stages 2-4 plus, when also step % r1_every == 0, a second update with
     lazy R1 (gamma / 2 * r1_every * R1). As in the original, whose gradients are not zeroed
     between the two `d_optim.step()` calls, that second update uses the logistic-loss
     gradient plus the R1 gradient.
  2. the trained networks take one step on l2 + lr_l2 + lpips + id + adv (weights from config).
The StyleGAN2 generator is never trained; networks a stage does not train are kept in
`TrainState.frozen`.

Random numbers (quantizer noise, generator noise maps) are drawn per example from the
example's index in the global batch, so N devices compute exactly what one device computes
on the same global batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax import losses, networks, optim, stages
from grain_jax.model import GRAIN
from grain_jax.quantizer import quantize_with_noise

AXIS = "data"
LOSS_TERMS = ("l2", "lr_l2", "lpips", "id", "adv", "ssim")


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes, as one pytree (what checkpoints hold)."""
  step: jax.Array
  params: Any          # optimizer view of the trained networks' params (see optim.wrap_params)
  opt_state: Any
  frozen: Any          # {'params': {network: ...}, 'buffers': ...}: networks not trained
  d_params: Any        # optimizer view of the discriminator's params
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


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """What a step needs besides its arguments (from the config, fixed for a run)."""
  model: GRAIN
  disc: nn.Module
  make_tx: Callable      # schedule length (int32 scalar) -> the optimizer
  make_d_tx: Callable    # the same for the discriminator
  stage: stages.Stage
  weights: dict          # loss term -> weight (0 = off)
  loss_nets: frozenset   # loss networks whose variables are passed in: 'lpips', 'irse50'
  d_every: int           # 0: the discriminator is never updated (benchmarks time the G step)
  r1_every: int
  r1_gamma: float
  axis_name: str | None = AXIS
  skip_nonfinite: bool = True  # the divergence guard (off only to time what it costs)

  @property
  def patch(self) -> bool:
    return self.stage.discriminator == "patch_discriminator"

  def pmean(self, tree):
    return jax.lax.pmean(tree, self.axis_name) if self.axis_name else tree


# ------------------------------------------------------------------------------ forward

def _example_noise(rng, index, model: GRAIN):
  """Quantizer noise (lr, lr, 3) and generator noise maps for one example of the global batch."""
  kq, kg = jax.random.split(jax.random.fold_in(rng, index))
  q = jax.random.uniform(kq, (model.lr_size, model.lr_size, 3), jnp.float32, -0.5, 0.5)
  g = []
  if model.generator is not None:
    shapes = model.generator.noise_shapes()
    g = [jax.random.normal(kk, s[1:]) for kk, s in zip(jax.random.split(kg, len(shapes)), shapes)]
  return q, g


def batch_noise(rng, n_local: int, model: GRAIN, axis_name: str | None):
  """Per-example noise for this device's shard, keyed by global example index."""
  offset = jax.lax.axis_index(axis_name) * n_local if axis_name else 0
  idx = offset + jnp.arange(n_local)
  return jax.vmap(lambda i: _example_noise(rng, i, model))(idx)


def forward(model: GRAIN, variables, x, q_noise, g_noise, stage: stages.Stage) -> dict:
  """Training forward pass up to the stage's output: dict(lr_float, lr, hr_inv[, hr_gan][, hr])."""
  def run(m, x):
    lr_float = m.encode(x)
    lr = quantize_with_noise(lr_float, q_noise)
    hr_inv, feats = m.decode(lr)
    out = dict(lr_float=lr_float, lr=lr, hr_inv=hr_inv)
    if stage.output == "hr_inv":
      return out
    out["hr_gan"], _, g_feats = m.synthesize(feats, list(g_noise))
    if stage.output == "hr":
      out["hr"] = m.fuse(feats, g_feats)
    return out
  return model.apply(variables, x, method=run)


# ------------------------------------------------------------------------------ the step

def discriminator_logits(s: StepSetup, d_params, d_stats, img):
  """Logits and new BatchNorm statistics (the patch D normalises with batch statistics)."""
  if s.patch:
    logits, upd = s.disc.apply({"params": d_params, "batch_stats": d_stats}, img, train=True,
                               mutable=["batch_stats"])
    return logits, upd["batch_stats"]
  return s.disc.apply({"params": d_params}, img), d_stats


def _r1_update(s: StepSetup, d_tx, d_params, d_opt_state, grads, real):
  """The lazy-R1 update: the logistic-loss gradient plus the weighted R1 gradient."""
  r1_fn = lambda p: losses.r1_penalty(lambda img: s.disc.apply({"params": p}, img), real)
  r1, r1_grads = jax.value_and_grad(r1_fn)(optim.model_params(d_params))
  scale = s.r1_gamma / 2 * s.r1_every
  total = jax.tree_util.tree_map(lambda g, h: g + scale * h, grads, s.pmean(r1_grads))
  updates, d_opt_state = d_tx.update(total, d_opt_state, d_params)
  return optax.apply_updates(d_params, updates), d_opt_state, r1


def discriminator_update(s: StepSetup, state: TrainState, x, y, noise):
  """One discriminator step (and the lazy R1 step when due) on a fresh fake batch."""
  fake = jax.lax.stop_gradient(
      forward(s.model, variables_of(state), x, *noise, s.stage)[s.stage.output])

  def loss_fn(d_params):
    real_logits, stats = discriminator_logits(s, d_params, state.d_batch_stats, y)
    fake_logits, stats = discriminator_logits(s, d_params, stats, fake)
    if s.patch:
      return losses.relativistic_discriminator(real_logits, fake_logits, s.axis_name), stats
    return losses.logistic_discriminator(real_logits, fake_logits), stats

  (d_loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      optim.model_params(state.d_params))
  grads = s.pmean(grads)
  d_tx = s.make_d_tx(state.schedule_steps)
  updates, d_opt_state = d_tx.update(grads, state.d_opt_state, state.d_params)
  d_params = optax.apply_updates(state.d_params, updates)
  r1 = jnp.zeros(())
  if not s.patch:
    d_params, d_opt_state, r1 = jax.lax.cond(
        state.step % s.r1_every == 0,
        lambda a: _r1_update(s, d_tx, *a, grads, y),
        lambda a: (*a, jnp.zeros(())), (d_params, d_opt_state))
  state = state.replace(d_params=d_params, d_opt_state=d_opt_state,
                        d_batch_stats=s.pmean(stats) if s.patch else stats)
  return state, {"d_loss": s.pmean(d_loss), "r1": s.pmean(r1)}


def generator_loss(s: StepSetup, trained, state: TrainState, x, y, noise, loss_vars):
  """(weighted total, {term: value}) of the stage's output against the targets."""
  out = forward(s.model, variables_of(state.replace(params=trained)), x, *noise, s.stage)
  hr = out[s.stage.output]
  w = s.weights
  terms = {"l2": losses.l2(hr, y)}
  if w["lr_l2"] > 0:
    terms["lr_l2"] = losses.lr_l2(out["lr_float"], y)
  if w["ssim"] > 0:
    terms["ssim"] = losses.ssim(hr, y)
  if w["lpips"] > 0 and "lpips" in s.loss_nets:
    terms["lpips"] = losses.lpips(loss_vars["lpips"], hr, y)
  if w["id"] > 0 and "irse50" in s.loss_nets:
    terms["id"] = losses.identity(loss_vars["irse50"], hr, y)
  if w["adv"] > 0:
    d_model = optim.model_params(state.d_params)
    fake_logits, _ = discriminator_logits(s, d_model, state.d_batch_stats, hr)
    if s.patch:
      real_logits, _ = discriminator_logits(s, d_model, state.d_batch_stats, y)
      terms["adv"] = losses.relativistic_generator(fake_logits, real_logits, s.axis_name)
    else:
      terms["adv"] = losses.nonsaturating_generator(fake_logits)
  return sum(w[k] * v for k, v in terms.items()), terms


def floating_leaves(tree) -> list:
  """The floating-point leaves of `tree` (the ones that can hold a NaN or infinity)."""
  return [a for a in jax.tree_util.tree_leaves(tree)
          if jax.dtypes.issubdtype(jnp.asarray(a).dtype, jnp.inexact)]


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value of `tree` is finite (a boolean scalar)."""
  leaves = [jnp.all(jnp.isfinite(a)) for a in floating_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _guard(s: StepSetup, old: TrainState, new: TrainState, metrics: dict):
  """The divergence guard: a step whose losses or new state (parameters, optimizer and
  discriminator states) hold a NaN or infinity is skipped, i.e. `old` is kept, and counted.

  Checking the whole new state, not only the loss, also catches an optimizer moment that
  overflowed while the parameters still look fine. Every device takes the same decision
  (pmin), so replicas never drift apart.
  """
  ok = all_finite(metrics) & all_finite(new.learned())
  if s.axis_name:
    ok = jax.lax.pmin(ok.astype(jnp.int32), s.axis_name).astype(bool)
  kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  bad = (~ok).astype(jnp.int32)
  return kept.replace(step=new.step, nonfinite_run=jnp.where(ok, 0, old.nonfinite_run + 1),
                      nonfinite_total=old.nonfinite_total + bad), bad


def train_step(s: StepSetup, state: TrainState, batch, loss_vars):
  """(state, batch dict(x, y) NHWC in [-1, 1], loss-network variables) -> (state, metrics).

  metrics: the losses, `nonfinite` (1 if this step was skipped by the divergence guard),
  `nonfinite_run` (consecutive skipped steps up to this one) and `nonfinite_total`.
  """
  old = state
  x, y = batch["x"], batch["y"]
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  d_rng, g_rng = jax.random.split(step_rng)
  metrics = {"d_loss": jnp.zeros(()), "r1": jnp.zeros(())}
  if s.weights["adv"] > 0 and s.d_every > 0:
    d_noise = batch_noise(d_rng, x.shape[0], s.model, s.axis_name)
    state, metrics = jax.lax.cond(
        state.step % s.d_every == 0,
        lambda st: discriminator_update(s, st, x, y, d_noise),
        lambda st: (st, metrics), state)
  g_noise = batch_noise(g_rng, x.shape[0], s.model, s.axis_name)
  loss_fn = lambda trained: generator_loss(s, trained, state, x, y, g_noise, loss_vars)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      optim.model_params(state.params))
  updates, opt_state = s.make_tx(state.schedule_steps).update(s.pmean(grads), state.opt_state,
                                                              state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  metrics = s.pmean({**metrics, **{f"loss_{k}": v for k, v in terms.items()}, "loss": loss})
  if s.skip_nonfinite:
    state, bad = _guard(s, old, state, metrics)
    metrics.update(nonfinite=bad, nonfinite_run=state.nonfinite_run,
                   nonfinite_total=state.nonfinite_total)
  return state, metrics


def make_parallel_step(step: Callable, mesh: Mesh) -> Callable:
  """Runs a per-device step over `mesh`'s "data" axis: state and loss networks replicated,
  the batch split along its first axis; the old state's buffers are donated."""
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


# ------------------------------------------------------------------------------ setup

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


def create_train_state(cfg, variables, d_variables, tx, d_tx) -> TrainState:
  """The initial state from the model's variables and the discriminator's (`tx`, `d_tx`:
  their optimizers, for the state's structure)."""
  stage = stages.get(cfg.stage)
  params = variables["params"]
  trained = {n: params[n] for n in stage.trains}
  frozen = {"params": {n: p for n, p in params.items() if n not in stage.trains},
            "buffers": variables.get("buffers", {})}
  wrapped = optim.wrap_params(cfg.optimizer, trained)
  d_wrapped = optim.wrap_params(cfg.optimizer, d_variables["params"])
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


class Training(NamedTuple):
  state: TrainState   # replicated over the mesh
  step: Callable      # jitted (state, batch, loss_vars) -> (state, metrics), state donated
  model: GRAIN        # the networks the stage runs


def create_training(cfg, variables, d_variables, loss_vars, mesh: Mesh,
                    skip_nonfinite: bool = True) -> Training:
  """The state and the data-parallel step of the stage `cfg` describes, over `mesh`.

  variables: the GRAIN model's ({'params': {network: ...}, 'buffers': ...}); d_variables:
  the stage's discriminator's; loss_vars: {'lpips'|'irse50': variables} of the loss networks.
  skip_nonfinite=False leaves out the divergence guard (only to measure what it costs).
  """
  stage = stages.get(cfg.stage)
  d_lr = cfg.learning_rate if cfg.d_learning_rate < 0 else cfg.d_learning_rate
  make_tx = lambda n: optim.make_optimizer(cfg.optimizer,
                                           learning_rate_schedule(cfg, cfg.learning_rate, n))
  make_d_tx = lambda n: optim.make_optimizer(cfg.optimizer, learning_rate_schedule(cfg, d_lr, n))
  disc = networks.build(stage.discriminator, cfg.model)
  if stage.discriminator == "patch_discriminator":
    disc = disc.clone(axis_name=AXIS)  # synchronised BatchNorm over the devices
  model = GRAIN.from_config(cfg.model, stage.runs)
  setup = StepSetup(model, disc, make_tx, make_d_tx, stage,
                    {k: float(cfg.loss[k]) for k in LOSS_TERMS},
                    frozenset(loss_vars), int(cfg.d_every), int(cfg.r1_every),
                    float(cfg.r1_gamma), skip_nonfinite=skip_nonfinite)
  state = create_train_state(cfg, variables, d_variables, make_tx(cfg.max_steps),
                             make_d_tx(cfg.max_steps))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  return Training(state, make_parallel_step(functools.partial(train_step, setup), mesh), model)
