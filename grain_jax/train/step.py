"""The jitted, data-parallel training step of a GRAIN stage (stages.py) on its train state
(state.py).

The updates are written per device, in the pmap style: each sees its shard of the global
batch, averages gradients (and the batch statistics that couple samples) with `lax.pmean`
over the "data" axis, and leaves every replica with the same new state. `Step` runs them over
all devices with `jax.shard_map` under `jax.jit` on a ("data",) mesh; `create_training`
builds the state and that step for a config (what the training loop, the benchmark and the
tests use).

Each step follows coaches/coachTrain.py:
  1. every `d_every`-th step (step % d_every == 0) the discriminator is updated first, on a
     fresh forward pass (of x in stages 1-2, of y in stages 3-4, as the original):
     relativistic-average BCE with the patch discriminator in stage 1, the logistic loss in
     stages 2-4 plus, when also step % r1_every == 0, a second update with lazy R1
     (gamma / 2 * r1_every * R1). As in the original, whose gradients are not zeroed
     between the two `d_optim.step()` calls, that second update uses the logistic-loss
     gradient plus the R1 gradient.
  2. the trained networks take one step on the loss terms of losses.LOSSES (GRAIN's: l2 + lr_l2
     + lpips + id + adv), weighted by the config's loss.*.
The StyleGAN2 generator is never trained; networks a stage does not train are kept in
`TrainState.frozen`. The divergence guard skips an update whose loss or new state is not
finite (the whole step when its input is bad).

Random numbers (quantizer noise, generator noise maps) are drawn per example from the
example's index in the global batch, so N devices compute exactly what one device computes
on the same global batch.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax.nets import layers, registry
from grain_jax.nets.model import GRAIN
from grain_jax.nets.quantizer import quantize_with_noise
from grain_jax.train import losses, optim, stages
from grain_jax.train.state import TrainState, all_finite, create_train_state, variables_of
from grain_jax.util import distributed

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """What a step needs besides its arguments (from the config, fixed for a run)."""
  model: GRAIN
  disc: nn.Module
  make_tx: Callable      # schedule length (int32 scalar) -> the optimizer
  make_d_tx: Callable    # the same for the discriminator
  prepare_gradients: Callable  # (opt params, gradient tree) -> what the optimizers take
  stage: stages.Stage
  weights: dict          # loss term -> weight (0 = off)
  loss_nets: frozenset   # loss networks whose variables are passed in: 'lpips', 'irse50'
  d_every: int           # 0: the discriminator is never updated (benchmarks time the G step)
  r1_every: int
  r1_gamma: float
  axis_name: str | None = AXIS
  skip_nonfinite: bool = True  # the divergence guard (off only to time what it costs)
  per_example: bool = False    # model.remat_per_example (see one_example_at_a_time)

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


def one_example_at_a_time(fn: Callable) -> Callable:
  """`fn` over a batch (every argument's leading axis), run one example at a time and
  recomputed in the backward pass: `lax.map` of `jax.checkpoint(fn)` on batches of one.

  For functions whose examples do not interact (no batch statistics). The forward pass keeps
  only the arguments and the outputs; the backward pass recomputes one example's activations,
  differentiates them and moves on, so it holds one example's activations instead of the
  batch's. The results equal `fn(*args)` up to the order in which weight gradients are summed.
  """
  def per_example(args):
    one = jax.tree_util.tree_map(lambda a: a[None], args)
    return jax.tree_util.tree_map(lambda a: a[0], fn(*one))

  def batched(*args):
    return jax.lax.map(jax.checkpoint(per_example), args)
  return batched


def forward(model: GRAIN, variables, x, q_noise, g_noise, stage: stages.Stage,
            per_example: bool = False) -> dict:
  """Training forward pass up to the stage's output: dict(lr_float, lr, hr_inv[, hr_gan][, hr]).
  GRAIN.__call__'s steps (encode, quantize, decode, synthesize, fuse), stopped at the stage's
  output, with the quantizer's and the generator's noise given per example.

  per_example: run it with `one_example_at_a_time` (model.remat_per_example).
  """
  def batch_forward(x, q_noise, g_noise):
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
  if per_example:
    return one_example_at_a_time(batch_forward)(x, q_noise, list(g_noise))
  return batch_forward(x, q_noise, g_noise)


# ------------------------------------------------------------------------------ the step

def discriminator_logits(s: StepSetup, d_params, d_stats, img):
  """Logits and new BatchNorm statistics (the patch D normalises with batch statistics)."""
  if s.patch:
    logits, upd = s.disc.apply({"params": d_params, "batch_stats": d_stats}, img, train=True,
                               mutable=["batch_stats"])
    return logits, upd["batch_stats"]
  variables = {"params": d_params}
  if s.per_example:  # the trunk one image at a time; the minibatch-stddev head on the batch
    trunk = one_example_at_a_time(lambda im: s.disc.apply(variables, im, method="trunk"))
    return s.disc.apply(variables, trunk(img), method="head"), d_stats
  return s.disc.apply(variables, img), d_stats


def _keep_if_finite(s: StepSetup, old: TrainState, new: TrainState, metrics: dict,
                    parts: tuple[str, ...]):
  """The divergence guard of one update: `new`, or `new` with `old`'s `parts` where the
  metrics or the new parts hold a NaN or infinity; and that flag (int32, 1 = kept old).

  Checking the new state, not only the loss, also catches an optimizer moment that
  overflowed while the parameters still look fine. Every device takes the same decision
  (pmin), so replicas never drift apart.
  """
  if not s.skip_nonfinite:
    return new, jnp.zeros((), jnp.int32)
  ok = all_finite(metrics) & all_finite([getattr(new, p) for p in parts])
  if s.axis_name:
    ok = jax.lax.pmin(ok.astype(jnp.int32), s.axis_name).astype(bool)
  kept = {p: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), getattr(new, p),
                                    getattr(old, p)) for p in parts}
  return new.replace(**kept), (~ok).astype(jnp.int32)


D_PARTS = ("d_params", "d_opt_state", "d_batch_stats")
G_PARTS = ("params", "opt_state")


def no_discriminator_update() -> dict:
  """The discriminator metrics of a step without a discriminator update."""
  return {"d_loss": jnp.zeros(()), "r1": jnp.zeros(()), "nonfinite": jnp.zeros((), jnp.int32)}


def discriminator_step(s: StepSetup, state: TrainState, batch):
  """The discriminator update on a fresh fake batch: (state, metrics, its gradient).

  The gradient (averaged over devices) is what the lazy R1 update adds to, as the original's
  un-zeroed gradients. A non-finite update is not applied (metrics['nonfinite'] = 1).
  """
  q_noise, g_noise = step_noise(s, state, batch)["d"]
  src = batch[s.stage.d_fake_from]
  fake = jax.lax.stop_gradient(
      forward(s.model, variables_of(state), src, q_noise, g_noise, s.stage,
              s.per_example)[s.stage.output])
  y = batch["y"]

  def loss_fn(d_params):
    real_logits, stats = discriminator_logits(s, d_params, state.d_batch_stats, y)
    fake_logits, stats = discriminator_logits(s, d_params, stats, fake)
    if s.patch:
      return losses.relativistic_discriminator(real_logits, fake_logits, s.axis_name), stats
    return losses.logistic_discriminator(real_logits, fake_logits), stats

  (d_loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      optim.model_params(state.d_params))
  grads = s.pmean(s.prepare_gradients(state.d_params, grads))
  updates, d_opt_state = s.make_d_tx(state.schedule_steps).update(grads, state.d_opt_state,
                                                                  state.d_params)
  new = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                      d_opt_state=d_opt_state,
                      d_batch_stats=s.pmean(stats) if s.patch else stats)
  metrics = {"d_loss": s.pmean(d_loss), "r1": jnp.zeros(())}
  new, bad = _keep_if_finite(s, state, new, metrics, D_PARTS)
  return new, {**metrics, "nonfinite": bad}, grads


def r1_step(s: StepSetup, state: TrainState, batch, grads, d_metrics: dict):
  """The lazy-R1 update after a discriminator update: its logistic-loss gradient `grads` plus
  the weighted R1 gradient (gamma / 2 * r1_every * R1), a second optimizer step as the
  original's. Returns (state, the step's discriminator metrics with r1)."""
  real = batch["y"]
  r1_fn = lambda p: losses.r1_penalty(
      lambda img: discriminator_logits(s, p, state.d_batch_stats, img)[0], real)
  r1, r1_grads = jax.value_and_grad(r1_fn)(optim.model_params(state.d_params))
  scale = s.r1_gamma / 2 * s.r1_every
  r1_grads = s.pmean(s.prepare_gradients(state.d_params, r1_grads))
  total = jax.tree_util.tree_map(lambda g, h: g + scale * h, grads, r1_grads)
  updates, d_opt_state = s.make_d_tx(state.schedule_steps).update(total, state.d_opt_state,
                                                                  state.d_params)
  new = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                      d_opt_state=d_opt_state)
  r1 = s.pmean(r1)
  new, bad = _keep_if_finite(s, state, new, {"r1": r1}, D_PARTS)
  return new, {**d_metrics, "r1": r1, "nonfinite": d_metrics["nonfinite"] | bad}


def generator_loss(s: StepSetup, trained, state: TrainState, x, y, noise, loss_vars):
  """(weighted total, {term: value}) of the stage's output against the targets."""
  out = forward(s.model, variables_of(state.replace(params=trained)), x, *noise, s.stage,
                s.per_example)
  hr = out[s.stage.output]

  def adversarial(img):
    d_model = optim.model_params(state.d_params)
    fake_logits, _ = discriminator_logits(s, d_model, state.d_batch_stats, img)
    if s.patch:
      real_logits, _ = discriminator_logits(s, d_model, state.d_batch_stats, y)
      return losses.relativistic_generator(fake_logits, real_logits, s.axis_name)
    return losses.nonsaturating_generator(fake_logits)

  inputs = losses.LossInputs(hr, y, out, loss_vars, adversarial)
  terms = {name: row.fn(inputs) for name, row in losses.LOSSES.items()
           if name in s.weights and (row.always or s.weights[name] > 0)
           and set(row.networks) <= s.loss_nets}
  return sum(s.weights[k] * v for k, v in terms.items()), terms


def step_noise(s: StepSetup, state: TrainState, batch) -> dict:
  """{'d', 'g'}: the per-example noise (quantizer, generator maps) of the discriminator
  step's and the generator step's forward passes, drawn from the state's rng and step, or
  the batch's `noise` entry where it has one (tests feed the original's draws that way)."""
  if "noise" in batch:
    return batch["noise"]
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  d_rng, g_rng = jax.random.split(step_rng)
  n = batch["x"].shape[0]
  return {"d": batch_noise(d_rng, n, s.model, s.axis_name),
          "g": batch_noise(g_rng, n, s.model, s.axis_name)}


def generator_step(s: StepSetup, state: TrainState, batch, loss_vars, d_metrics: dict):
  """The trained networks' update, which ends a step: (state, metrics).

  d_metrics: this step's discriminator metrics (no_discriminator_update() on a step without).
  metrics: the losses, d_loss and r1, `nonfinite` (1 if an update of this step was skipped
  by the divergence guard), `nonfinite_run` (consecutive such steps up to this one) and
  `nonfinite_total`.
  """
  x, y = batch["x"], batch["y"]
  q_noise, g_noise = step_noise(s, state, batch)["g"]
  loss_fn = lambda trained: generator_loss(s, trained, state, x, y, (q_noise, g_noise),
                                           loss_vars)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      optim.model_params(state.params))
  grads = s.pmean(s.prepare_gradients(state.params, grads))
  updates, opt_state = s.make_tx(state.schedule_steps).update(grads, state.opt_state,
                                                              state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)
  metrics = s.pmean({f"loss_{k}": v for k, v in terms.items()} | {"loss": loss})
  new, bad = _keep_if_finite(s, state, new, metrics, G_PARTS)
  metrics.update(d_loss=d_metrics["d_loss"], r1=d_metrics["r1"])
  if s.skip_nonfinite:
    bad = bad | d_metrics["nonfinite"]
    new = new.replace(nonfinite_run=jnp.where(bad > 0, state.nonfinite_run + 1, 0),
                      nonfinite_total=state.nonfinite_total + bad)
    metrics.update(nonfinite=bad, nonfinite_run=new.nonfinite_run,
                   nonfinite_total=new.nonfinite_total)
  return new, metrics


class Step:
  """One training step as the training loop runs it: (state, batch, loss_vars) -> (state, metrics).

  The batch: dict(x, y) NHWC in [-1, 1], split over the mesh's "data" axis; it may also
  carry `noise` ({'d', 'g'}: (quantizer noise (N, lr, lr, 3), [generator noise maps
  (N, R, R, 1)]) of each pass) instead of drawing it (see step_noise).

  As in coaches/coachTrain.py, a step whose number is a multiple of `d_every` first updates
  the discriminator, and when it is also a multiple of `r1_every` (StyleGAN2's D) applies
  lazy R1; then the trained networks take their step. Each update is its own jitted,
  data-parallel program (shard_map over "data", state replicated and donated), chosen here
  from the step number rather than by a `lax.cond` inside one program, inside which XLA:CPU
  runs the convolution gradients much more slowly. The host knows the step number without
  waiting for the device: it remembers the step array it returned last and reads
  `state.step` only for another state.
  """

  def __init__(self, setup: StepSetup, mesh: Mesh):
    self.setup = setup
    rep, data = P(), P(AXIS)
    program = lambda f, ins, outs, donate: jax.jit(
        jax.shard_map(functools.partial(f, setup), mesh=mesh, in_specs=ins, out_specs=outs,
                      check_vma=False), donate_argnums=donate)
    self.programs = {
        "d": program(discriminator_step, (rep, data), (rep, rep, rep), (0,)),
        "r1": program(r1_step, (rep, data, rep, rep), (rep, rep), (0,)),
        "g": program(generator_step, (rep, data, rep, rep), (rep, rep), (0,))}
    # The discriminator metrics of a step without a D update, placed on the mesh at the first
    # call: building (and lowering) the programs puts nothing on a device, so they can be
    # compiled ahead of time for devices this host does not have (train/aot.py).
    self._no_d_sharding = NamedSharding(mesh, rep)
    self._no_d = None
    self._last = (None, 0)  # (the step array last returned, its value)

  def due(self, step: int) -> tuple[str, ...]:
    """The programs step number `step` (0-based, the state's before it) runs, in order."""
    s = self.setup
    if not (losses.uses_discriminator(s.weights) and s.d_every > 0 and step % s.d_every == 0):
      return ("g",)
    return ("d", "r1", "g") if not s.patch and step % s.r1_every == 0 else ("d", "g")

  def step_number(self, state: TrainState) -> int:
    """`state.step` on the host, without a device round trip for the state it returned."""
    if state.step is self._last[0]:
      return self._last[1]
    return int(distributed.host_copy(state.step))

  def __call__(self, state: TrainState, batch, loss_vars):
    n = self.step_number(state)
    due = self.due(n)
    if self._no_d is None:
      self._no_d = jax.device_put(no_discriminator_update(), self._no_d_sharding)
    d_metrics = self._no_d
    if "d" in due:
      state, d_metrics, grads = self.programs["d"](state, batch)
      if "r1" in due:
        state, d_metrics = self.programs["r1"](state, batch, grads, d_metrics)
    state, metrics = self.programs["g"](state, batch, loss_vars, d_metrics)
    self._last = (state.step, n + 1)
    return state, metrics

  def lower(self, state: TrainState, batch, loss_vars, only: tuple[str, ...] | None = None,
            step: int | None = None) -> list:
    """The jax.stages.Lowered programs of the step `state` is at (or of step number `step`),
    or those of them named in `only`. The arguments may be jax.ShapeDtypeStructs with
    shardings on the mesh: an ahead-of-time compile for devices this host does not have
    (train/aot.py)."""
    due = self.due(self.step_number(state) if step is None else step)
    replicated = lambda tree: jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._no_d_sharding), tree)
    out, d_metrics = [], replicated(jax.eval_shape(no_discriminator_update))
    if "d" in due:
      if only is None or "d" in only:
        out.append(self.programs["d"].lower(state, batch))
      _, d_metrics, grads = replicated(jax.eval_shape(self.programs["d"], state, batch))
      if "r1" in due and (only is None or "r1" in only):
        out.append(self.programs["r1"].lower(state, batch, grads, d_metrics))
    if only is None or "g" in only:
      out.append(self.programs["g"].lower(state, batch, loss_vars, d_metrics))
    return out

  def compile(self, state: TrainState, batch, loss_vars) -> tuple[list, list]:
    """Compiles the programs of the step `state` is at ahead of time, side by side (XLA
    compiles a program on one core); later steps of that kind run the compiled ones.
    Returns their (Lowered, Compiled) lists."""
    due = self.due(self.step_number(state))
    lowered = self.lower(state, batch, loss_vars)
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
      compiled = list(pool.map(lambda low: low.compile(), lowered))
    self.programs.update(zip(due, compiled))
    return lowered, compiled


# ------------------------------------------------------------------------------ setup

class Training(NamedTuple):
  state: TrainState   # replicated over the mesh
  step: Step          # (state, batch, loss_vars) -> (state, metrics), state donated
  model: GRAIN        # the networks the stage runs


def create_training(cfg, variables, d_variables, loss_vars, mesh: Mesh,
                    skip_nonfinite: bool = True) -> Training:
  """The state and the data-parallel step of the stage `cfg` describes, over `mesh`.

  variables: the GRAIN model's ({'params': {network: ...}, 'buffers': ...}); d_variables:
  the stage's discriminator's; loss_vars: {'lpips'|'irse50': variables} of the loss networks.
  Given as jax.ShapeDtypeStructs, the state is too (with its sharding on the mesh): for
  compiling the step ahead of time for devices this host does not have (train/aot.py).
  skip_nonfinite=False leaves out the divergence guard (only to measure what it costs).
  """
  stage = stages.get(cfg.stage)
  d_lr = cfg.learning_rate if cfg.d_learning_rate < 0 else cfg.d_learning_rate
  schedule = optim.learning_rate_schedule
  make_tx = lambda n: optim.make_optimizer(
      cfg.optimizer, schedule(cfg, cfg.learning_rate, n), prepared=True)
  make_d_tx = lambda n: optim.make_optimizer(cfg.optimizer, schedule(cfg, d_lr, n),
                                             prepared=True)
  prepare = functools.partial(optim.optimizer_gradients, cfg.optimizer)
  # 'auto' convolution weight gradients as the mesh's devices want them, not the host's.
  model_cfg = layers.for_platform(cfg.model, mesh.devices.flat[0].platform)
  disc = registry.build(stage.discriminator, model_cfg)
  if stage.discriminator == "patch_discriminator":
    disc = disc.clone(axis_name=AXIS)  # synchronised BatchNorm over the devices
  model = GRAIN.from_config(model_cfg, stage.runs)
  setup = StepSetup(model, disc, make_tx, make_d_tx, prepare, stage,
                    {k: float(cfg.loss[k]) for k in losses.LOSSES if k in cfg.loss},
                    frozenset(loss_vars), int(cfg.d_every), int(cfg.r1_every),
                    float(cfg.r1_gamma), skip_nonfinite=skip_nonfinite,
                    per_example=bool(model_cfg.get("remat_per_example", False)))
  make_state = lambda v, d: create_train_state(cfg, v, d, make_tx(cfg.max_steps),
                                               make_d_tx(cfg.max_steps))
  replicated = NamedSharding(mesh, P())
  if all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(variables)):
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(make_state, variables, d_variables))
  else:
    state = jax.device_put(make_state(variables, d_variables), replicated)
  return Training(state, Step(setup, mesh), model)
