"""Mixed precision (model.compute_dtype) and rematerialisation (model.remat)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grain_jax.train import losses, stages
from grain_jax.nets.model import GRAIN, init_variables
from grain_jax.train.step import forward
from tiny_config import tiny_model


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_model()
  variables = init_variables(GRAIN.from_config(cfg), 0)
  x = np.random.default_rng(0).uniform(-1, 1, (2, cfg.hr_size, cfg.hr_size, 3)).astype(np.float32)
  return cfg, variables, x


def with_options(cfg, **kw):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(kw)
  return cfg


def conv_dtypes(fn, *args):
  """Input dtypes of every convolution in fn's jaxpr (nested jaxprs included)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append(str(eqn.invars[0].aval.dtype))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_bfloat16_upscale_is_close_to_float32_and_really_bfloat16(tiny):
  cfg, variables, x = tiny
  m32 = GRAIN.from_config(cfg)
  m16 = GRAIN.from_config(with_options(cfg, compute_dtype="bfloat16"))
  run = lambda m: jax.jit(lambda v, x: m.apply(v, m.apply(v, x, method=m.downscale),
                                                method=m.upscale))
  out32, out16 = run(m32)(variables, x), run(m16)(variables, x)
  for k in ("hr_inv", "hr_gan", "hr"):
    assert out16[k].dtype == jnp.float32
    a, b = np.asarray(out32[k]), np.asarray(out16[k])
    rms = np.sqrt(np.mean(a ** 2))
    # bfloat16 keeps 8 significant bits: errors of a few per cent of the signal, not more.
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.05 * rms, k
    assert not np.array_equal(a, b), k  # the switch did something
  # The convolutions run in bfloat16 (the quantizer stays float32: LR values are exact).
  dts = conv_dtypes(lambda v, x: m16.apply(v, x), variables, x)
  assert dts and dts.count("bfloat16") / len(dts) > 0.9, sorted(set(dts))
  lr = np.asarray(m16.apply(variables, x, method=m16.downscale))
  levels = (lr + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


@pytest.fixture(scope="module")
def finetune_grads(tiny):
  """grads(compute_dtype, remat) -> (gradients of a stage-4 loss, the grad's jaxpr text)."""
  cfg, variables, x = tiny
  stage = stages.get("finetune")
  cache = {}

  def get(dtype, remat):
    if (dtype, remat) not in cache:
      m = GRAIN.from_config(with_options(cfg, compute_dtype=dtype, remat=remat))
      q = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 4, 4, 3)).astype(np.float32)
      g_noise = [np.zeros((2,) + s[1:], np.float32) for s in m.generator.noise_shapes()]

      def loss(params):
        out = forward(m, {**variables, "params": params}, x, q, g_noise, stage)
        return losses.l2(out["hr"], x) + losses.lr_l2(out["lr_float"], x)
      grad = jax.grad(loss)
      cache[dtype, remat] = (jax.jit(grad)(variables["params"]),
                             str(jax.make_jaxpr(grad)(variables["params"])))
    return cache[dtype, remat]
  return get


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree_util.tree_leaves(tree)])


def test_bfloat16_gradients_reach_float32_params(finetune_grads):
  g32, _ = finetune_grads("float32", False)
  g16, _ = finetune_grads("bfloat16", False)
  assert jax.tree_util.tree_structure(g16) == jax.tree_util.tree_structure(g32)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(g16))
  a, b = flat(g32), flat(g16)
  cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  assert 0.99 < cos < 1.0, cos


def test_remat_gives_the_same_gradients(finetune_grads):
  """Remat on: every RRDB, StyledConv and the Fusion net are recomputed in the backward
  pass (the jaxpr holds checkpoint regions), and the gradients are unchanged."""
  g, jaxpr = finetune_grads("float32", False)
  g_remat, jaxpr_remat = finetune_grads("float32", True)
  assert "checkpoint" not in jaxpr and "remat" not in jaxpr
  assert jaxpr_remat.count("checkpoint") + jaxpr_remat.count("remat") >= 3
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_scanned_blocks_keep_the_parameters_outputs_and_gradients(tiny):
  """model.scan_blocks: each run of same-shaped RRDBs is one lax.scan over its stacked
  parameters (one compiled block instead of one per RRDB). The parameter tree is the one
  without it, and a stage-1 step's loss and gradients match the unrolled blocks' (the
  scan's stacked gradient sums in another order: <= 1e-6 of the gradients' RMS), with and
  without remat."""
  cfg = with_options(tiny[0], conv_weight_grad="xla")
  cfg.rescaler.update(encoder_blocks=3, decoder_blocks=(2, 1))
  scanned = with_options(cfg, scan_blocks=True)
  x = tiny[2]
  parts = stages.get("invrrdb").runs
  variables = init_variables(GRAIN.from_config(cfg, parts), 0)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, variables, init_variables(GRAIN.from_config(scanned, parts), 0)))

  def loss_and_grads(c):
    m = GRAIN.from_config(c, parts)
    q = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 4, 4, 3)).astype(np.float32)

    def loss(params):
      out = forward(m, {**variables, "params": params}, x, q, [], stages.get("invrrdb"))
      return losses.l2(out["hr_inv"], x) + losses.lr_l2(out["lr"], x)
    fn = jax.value_and_grad(loss)
    (value, grads), jaxpr = jax.jit(fn)(variables["params"]), jax.make_jaxpr(fn)(variables["params"])
    return value, flat(grads), str(jaxpr)

  l0, g0, jaxpr0 = loss_and_grads(cfg)
  l1, g1, jaxpr1 = loss_and_grads(scanned)
  l2, g2, _ = loss_and_grads(with_options(scanned, remat=True))
  # Two scans forward (the encoder's trunk, the decoder's first level) and two backward.
  assert "scan[" not in jaxpr0 and jaxpr1.count("scan[") == 4
  rms = np.sqrt(np.mean(g0 ** 2))
  for loss, grads in ((l1, g1), (l2, g2)):
    np.testing.assert_allclose(float(loss), float(l0), rtol=1e-6)
    assert np.sqrt(np.mean((grads - g0) ** 2)) <= 1e-6 * rms


def test_remat_per_example_gives_the_same_steps():
  """model.remat_per_example: the stage's forward pass (and the StyleGAN2 discriminator's
  trunk) runs one image at a time, recomputed in the backward pass. A stage-4 step of d, r1
  and g updates on a batch of 4 (the discriminator's minibatch-stddev group) ends with the
  same parameters and losses as the plain step, up to the order of summed weight gradients."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from grain_jax.train import initial_weights, optim
  from grain_jax.train.step import create_training
  from tiny_config import tiny_training

  cfg = tiny_training("finetune", d_every=1, r1_every=1, batch_size=4)
  v, dv, lv, _ = initial_weights.initial_variables(cfg)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  rng = np.random.default_rng(0)
  batch = {k: rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32) for k in "xy"}

  def run(per_example):
    c = cfg.copy_and_resolve_references()
    c.model.remat_per_example = per_example
    training = create_training(c, v, dv, lv, mesh)
    state, loss_vars = training.state, jax.device_put(lv, NamedSharding(mesh, P()))
    lowered, _ = training.step.compile(state, batch, loss_vars)  # the step runs these
    text = "".join(low.as_text() for low in lowered)
    state, metrics = training.step(state, batch, loss_vars)
    trained = (optim.model_params(state.params), optim.model_params(state.d_params))
    return flat(jax.device_get(trained)), jax.device_get(metrics), text

  p0, m0, text0 = run(False)
  p1, m1, text1 = run(True)
  assert text1.count("stablehlo.while") > text0.count("stablehlo.while")  # the lax.maps
  assert m0["d_loss"] > 0 and m0["r1"] > 0
  for k in ("loss", "d_loss", "r1"):
    np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-6, err_msg=k)
  print("per-example vs plain, RMS difference / RMS:",
        np.sqrt(np.mean((p1 - p0) ** 2)) / np.sqrt(np.mean(p0 ** 2)))
  assert np.sqrt(np.mean((p1 - p0) ** 2)) <= 1e-6 * np.sqrt(np.mean(p0 ** 2))
