"""GRAIN's four training stages: the train state and one jitted, data-parallel training step.

A step is written per device, in the pmap style: it sees its shard of the global batch,
averages gradients (and the batch statistics that couple samples) with `lax.pmean` over the
"data" axis, and leaves every replica with the same new state. `make_parallel_step` runs it
over all devices with `jax.shard_map` under `jax.jit` on a ("data",) mesh.

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
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from grain_jax import losses, optim
from grain_jax.discriminators import PatchDiscriminator, StyleGAN2Discriminator
from grain_jax.model import GRAIN
from grain_jax.rescaler import quantize_with_noise

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Stage:
  trains: tuple[str, ...]    # networks updated by the optimizer
  runs: tuple[str, ...]      # networks the forward pass needs
  output: str                # the image the losses judge
  discriminator: str         # 'patch' (stage 1) or 'stylegan2'


STAGES = {
    "invrrdb": Stage(("rescaler",), ("rescaler",), "hr_inv", "patch"),
    "fea2code": Stage(("fea2code",), ("rescaler", "fea2code", "generator"), "hr_gan",
                      "stylegan2"),
    "fusion": Stage(("fusion",), ("rescaler", "fea2code", "generator", "fusion"), "hr",
                    "stylegan2"),
    "finetune": Stage(("rescaler", "fea2code", "fusion"),
                      ("rescaler", "fea2code", "generator", "fusion"), "hr", "stylegan2"),
}


def get_stage(name: str) -> Stage:
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
  return STAGES[name]


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


def grain_variables(state: TrainState) -> dict:
  """The GRAIN variables (trained + frozen, including networks the stage does not run)."""
  params = dict(state.frozen["params"])
  params.update(optim.model_params(state.params))
  return {"params": params, "buffers": state.frozen.get("buffers", {})}


def build_discriminator(cfg, stage: Stage, axis_name: str | None = AXIS) -> nn.Module:
  if stage.discriminator == "patch":
    pd = cfg.model.patch_discriminator
    return PatchDiscriminator(tuple(pd.widths), int(pd.input_size), axis_name=axis_name)
  d = cfg.model.discriminator
  return StyleGAN2Discriminator(int(cfg.model.hr_size), tuple(d.channels),
                                tuple(cfg.model.generator.blur_kernel),
                                stddev_group=int(d.stddev_group))


def _example_noise(rng, index, model: GRAIN, lr_size: int):
  """Quantizer noise (lr, lr, 3) and generator noise maps for one example of the global batch."""
  k = jax.random.fold_in(rng, index)
  kq, kg = jax.random.split(k)
  q = jax.random.uniform(kq, (lr_size, lr_size, 3), jnp.float32, -0.5, 0.5)
  g = []
  if model.generator is not None:
    shapes = model.generator.noise_shapes()
    g = [jax.random.normal(kk, s[1:]) for kk, s in zip(jax.random.split(kg, len(shapes)), shapes)]
  return q, g


def batch_noise(rng, n_local: int, model: GRAIN, lr_size: int, axis_name: str | None):
  """Per-example noise for this device's shard, keyed by global example index."""
  offset = jax.lax.axis_index(axis_name) * n_local if axis_name else 0
  idx = offset + jnp.arange(n_local)
  return jax.vmap(lambda i: _example_noise(rng, i, model, lr_size))(idx)


def forward(model: GRAIN, variables, x, q_noise, g_noise, stage: Stage) -> dict:
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


def make_train_step(cfg, model: GRAIN, disc: nn.Module, tx: optax.GradientTransformation,
                    d_tx: optax.GradientTransformation, loss_nets: dict,
                    axis_name: str | None = AXIS) -> Callable:
  """The per-device step (state, batch, loss_variables) -> (state, metrics).

  `batch` is dict(x=inputs, y=targets), NHWC in [-1, 1]; `loss_nets` names the loss networks
  whose variables are passed in: 'lpips', 'irse50' (absent ones are off).
  """
  stage = get_stage(cfg.stage)
  w = cfg.loss
  lr_size = int(cfg.model.lr_size)
  patch = stage.discriminator == "patch"
  use_adv = w.adv > 0
  update_d = use_adv and cfg.d_every > 0  # d_every 0: D frozen (benchmarks time the G step)
  pmean = (lambda t: jax.lax.pmean(t, axis_name)) if axis_name else (lambda t: t)

  def d_apply(d_params, d_stats, img):
    """Discriminator logits; the patch D uses batch statistics and returns new ones."""
    if patch:
      logits, upd = disc.apply({"params": d_params, "batch_stats": d_stats}, img, train=True,
                               mutable=["batch_stats"])
      return logits, upd["batch_stats"]
    return disc.apply({"params": d_params}, img), d_stats

  def fake_images(state, x, noise):
    out = forward(model, grain_variables(state), x, *noise, stage)
    return jax.lax.stop_gradient(out[stage.output])

  def d_update(state, x, y, noise):
    fake = fake_images(state, x, noise)

    def loss_fn(d_params):
      real_logits, stats = d_apply(d_params, state.d_batch_stats, y)
      fake_logits, stats = d_apply(d_params, stats, fake)
      if patch:
        loss = losses.relativistic_discriminator(real_logits, fake_logits, axis_name)
      else:
        loss = losses.logistic_discriminator(real_logits, fake_logits)
      return loss, stats

    d_model = optim.model_params(state.d_params)
    (d_loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_model)
    grads = pmean(grads)
    updates, d_opt_state = d_tx.update(grads, state.d_opt_state, state.d_params)
    d_params = optax.apply_updates(state.d_params, updates)
    r1 = jnp.zeros(())
    if not patch:
      def with_r1(args):
        d_params, d_opt_state = args
        r1_fn = lambda p: losses.r1_penalty(lambda img: disc.apply({"params": p}, img), y)
        r1, r1_grads = jax.value_and_grad(r1_fn)(optim.model_params(d_params))
        scale = cfg.r1_gamma / 2 * cfg.r1_every
        total = jax.tree_util.tree_map(lambda g, h: g + scale * h, grads, pmean(r1_grads))
        updates, d_opt_state = d_tx.update(total, d_opt_state, d_params)
        return optax.apply_updates(d_params, updates), d_opt_state, r1

      d_params, d_opt_state, r1 = jax.lax.cond(
          state.step % cfg.r1_every == 0, with_r1,
          lambda args: (*args, jnp.zeros(())), (d_params, d_opt_state))
    state = state.replace(d_params=d_params, d_opt_state=d_opt_state,
                          d_batch_stats=pmean(stats) if patch else stats)
    return state, {"d_loss": pmean(d_loss), "r1": pmean(r1)}

  def g_loss(trained, state, x, y, noise, loss_vars):
    variables = grain_variables(state.replace(params=trained))
    out = forward(model, variables, x, *noise, stage)
    hr = out[stage.output]
    terms = {"l2": losses.l2(hr, y)}
    if w.lr_l2 > 0:
      terms["lr_l2"] = losses.lr_l2(out["lr_float"], y)
    if w.lpips > 0 and "lpips" in loss_nets:
      terms["lpips"] = losses.lpips(loss_vars["lpips"], hr, y)
    if w.id > 0 and "irse50" in loss_nets:
      terms["id"] = losses.identity(loss_vars["irse50"], hr, y)
    if use_adv:
      d_model = optim.model_params(state.d_params)
      fake_logits, _ = d_apply(d_model, state.d_batch_stats, hr)
      if patch:
        real_logits, _ = d_apply(d_model, state.d_batch_stats, y)
        terms["adv"] = losses.relativistic_generator(fake_logits, real_logits, axis_name)
      else:
        terms["adv"] = losses.nonsaturating_generator(fake_logits)
    total = sum(getattr(w, k) * v for k, v in terms.items())
    return total, terms

  def step(state: TrainState, batch, loss_vars):
    x, y = batch["x"], batch["y"]
    rng = jax.random.wrap_key_data(state.rng)
    step_rng = jax.random.fold_in(rng, state.step)
    d_rng, g_rng = jax.random.split(step_rng)
    n_local = x.shape[0]
    metrics = {"d_loss": jnp.zeros(()), "r1": jnp.zeros(())}
    if update_d:
      d_noise = batch_noise(d_rng, n_local, model, lr_size, axis_name)
      state, metrics = jax.lax.cond(
          state.step % cfg.d_every == 0,
          lambda s: d_update(s, x, y, d_noise),
          lambda s: (s, metrics), state)
    g_noise = batch_noise(g_rng, n_local, model, lr_size, axis_name)
    trained = optim.model_params(state.params)
    (loss, terms), grads = jax.value_and_grad(g_loss, has_aux=True)(
        trained, state, x, y, g_noise, loss_vars)
    grads = pmean(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    metrics = {**metrics, **{f"loss_{k}": v for k, v in terms.items()}, "loss": loss}
    return state, pmean(metrics)

  return step


def make_parallel_step(step: Callable, mesh: Mesh) -> Callable:
  """Runs a per-device step over `mesh`'s "data" axis: state and loss networks replicated,
  the batch split along its first axis; the old state's buffers are donated."""
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))
