"""Ranger (its RAdam + optax lookahead + gradient centralization) against a direct NumPy
implementation of the PyTorch Ranger GRAIN trains with, on a toy least-squares problem.
(tests/test_training_parity.py checks it against the PyTorch Ranger itself, inside GRAIN's
training loop.)"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from grain_jax.train import optim, packed


def reference_ranger(params, grad_fn, steps, lr=1e-3, b1=0.95, b2=0.999, eps=1e-5, k=6,
                     alpha=0.5):
  """lessw2020's Ranger (pSp's copy) written out in NumPy on Flax-layout (HWIO) parameters.

  Gradient centralization subtracts the mean over all axes but the output one (torch's dims
  1.. of an (out, in, kh, kw) weight), for tensors of rank > 1.
  """
  p = {k_: v.astype(np.float64) for k_, v in params.items()}
  m = {k_: np.zeros_like(v) for k_, v in p.items()}
  v2 = {k_: np.zeros_like(v) for k_, v in p.items()}
  slow = {k_: v.copy() for k_, v in p.items()}
  n_sma_max = 2 / (1 - b2) - 1
  trajectory = []
  for t in range(1, steps + 1):
    grads = grad_fn(p)
    for name in p:
      g = np.asarray(grads[name], np.float64)
      if g.ndim > 1:
        g = g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True)
      m[name] = b1 * m[name] + (1 - b1) * g
      v2[name] = b2 * v2[name] + (1 - b2) * g * g
      b2t = b2 ** t
      n_sma = n_sma_max - 2 * t * b2t / (1 - b2t)
      if n_sma > 5:
        step = math.sqrt((1 - b2t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
                         * n_sma_max / (n_sma_max - 2)) / (1 - b1 ** t)
        p[name] = p[name] - lr * step * m[name] / (np.sqrt(v2[name]) + eps)
      else:
        p[name] = p[name] - lr * m[name] / (1 - b1 ** t)
      if t % k == 0:
        slow[name] = slow[name] + alpha * (p[name] - slow[name])
        p[name] = slow[name].copy()
    trajectory.append({k_: v.copy() for k_, v in p.items()})
  return trajectory


def test_ranger_follows_the_pytorch_ranger_on_a_toy_problem():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(64, 3 * 3 * 4)).astype(np.float32)
  target = rng.normal(size=(64, 5)).astype(np.float32)
  params = {"kernel": rng.normal(size=(3, 3, 4, 5)).astype(np.float32),
            "bias": rng.normal(size=(5,)).astype(np.float32)}

  def loss(p):
    pred = a @ p["kernel"].reshape(-1, 5) + p["bias"]
    return 10.0 * jnp.mean((pred - target) ** 2)

  grad = jax.jit(jax.grad(loss))
  want = reference_ranger(params, lambda p: jax.tree_util.tree_map(
      np.asarray, grad({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})), steps=30,
      lr=5e-2)

  cfg = ml_collections.ConfigDict(dict(name="ranger", b1=0.95, b2=0.999, eps=1e-5,
                                       sync_period=6, slow_step_size=0.5))
  tx = optim.make_optimizer(cfg, 5e-2)
  opt_params = optim.wrap_params(cfg, jax.tree_util.tree_map(jnp.asarray, params))
  state = tx.init(opt_params)

  @jax.jit
  def step(opt_params, state):
    g = grad(optim.model_params(opt_params))
    updates, state = tx.update(g, state, opt_params)
    return optax.apply_updates(opt_params, updates), state

  losses = [float(loss(params))]
  for t in range(30):
    opt_params, state = step(opt_params, state)
    got = optim.model_params(opt_params)
    for name in params:
      move = np.abs(want[t][name] - params[name]).max()
      err = np.abs(np.asarray(got[name]) - want[t][name]).max()
      assert err <= 1e-5 * move, (t, name, err, move)
    losses.append(float(loss(got)))
  assert losses[-1] < 0.4 * losses[0]
  # After a sync step (6, 12, ...) the slow weights equal the fast ones.
  np.testing.assert_allclose(np.asarray(opt_params.fast["bias"]),
                             np.asarray(opt_params.slow["bias"]), rtol=1e-6)


def test_gradient_centralization_leaves_vectors_and_zeroes_kernel_means():
  g = {"k": jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) ** 2,
       "b": jnp.arange(4.0)}
  out, _ = optim.centralize_gradients().update(g, optax.EmptyState())
  np.testing.assert_allclose(np.asarray(out["k"]).mean(axis=(0, 1)), 0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out["b"]), np.arange(4.0))


def test_packed_parameters_take_the_same_steps():
  """Ranger and Adam on parameters packed into one vector per dtype (as the train state holds
  them) against the same optimizer per tensor: equal after every step, gradient
  centralization included, up to float rounding (XLA fuses the unpacking slices into the
  gradient's computation, which can round a sum differently: 1 ulp here)."""
  rng = np.random.default_rng(1)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 5)).astype(np.float32),
                     "bias": rng.normal(size=(5,)).astype(np.float32)},
            "dense": {"kernel": rng.normal(size=(5, 2)).astype(np.float32)}}
  x = rng.normal(size=(8, 3, 3, 4)).astype(np.float32)

  def loss(p):
    h = jnp.einsum("nhwc,hwco->no", x, p["conv"]["kernel"]) + p["conv"]["bias"]
    return jnp.mean(jnp.tanh(h) @ p["dense"]["kernel"] ** 2)

  for name in ("ranger", "adam"):
    cfg = ml_collections.ConfigDict(dict(name=name, b1=0.95, b2=0.999, eps=1e-5,
                                         sync_period=3, slow_step_size=0.5))
    # As the train step: gradients prepared (centralized per tensor, packed) for an
    # optimizer that takes them so; against the plain optimizer on the tree.
    txs = {False: optim.make_optimizer(cfg, 1e-2),
           True: optim.make_optimizer(cfg, 1e-2, prepared=True)}

    @functools.partial(jax.jit, static_argnums=2)
    def step(opt_params, state, prepared):
      g = jax.grad(loss)(optim.model_params(opt_params))
      if prepared:
        g = optim.optimizer_gradients(cfg, opt_params, g)
      updates, state = txs[prepared].update(g, state, opt_params)
      return optax.apply_updates(opt_params, updates), state

    per_tensor = optim.wrap_params(cfg, jax.tree_util.tree_map(jnp.asarray, params))
    packed_ = optim.wrap_params(cfg, packed.pack(params))
    assert len(jax.tree_util.tree_leaves(optim._run_view(packed_))) == 1
    runs = [(p, txs[k].init(p), k) for k, p in ((False, per_tensor), (True, packed_))]
    for t in range(7):
      runs = [(*step(*r), r[2]) for r in runs]
      a, b = (optim.model_params(p) for p, _, _ in runs)
      for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name} {t}")
    # Both moved (the comparison is not between two untouched states).
    assert not np.array_equal(np.asarray(a["dense"]["kernel"]), params["dense"]["kernel"])


def test_a_packed_tree_round_trips_and_refuses_another_structure():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int32),
          "c": np.zeros((), np.float32)}
  p = packed.pack(tree)
  assert {k: v.shape for k, v in p.buffers.items()} == {"float32": (7,), "int32": (2,)}
  back = p.unpack()
  for k in tree:
    np.testing.assert_array_equal(np.asarray(back[k]), tree[k])
    assert back[k].dtype == tree[k].dtype
  state = {"p": p, "other": jnp.ones(3)}
  flat = packed.unpack_all(state)
  again = packed.pack_like(state, flat)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(state)
  with pytest.raises(ValueError, match="cannot pack"):
    p.layout.pack({"a": tree["a"]})


def test_centralization_refuses_packed_updates_instead_of_skipping_them():
  """In a packed vector the kernels' shapes are gone: centralizing it would silently do
  nothing, so the transform refuses it and names the route that centralizes per tensor."""
  p = packed.pack({"k": jnp.ones((3, 3, 2, 4)), "b": jnp.ones(4)})
  with pytest.raises(TypeError, match="optimizer_gradients"):
    optim.centralize_gradients().update(p, optax.EmptyState())
