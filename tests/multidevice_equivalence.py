"""Run by test_training.py in a subprocess with 4 simulated CPU devices: the same 3 training
steps of stage 1 (discriminator updates and synchronised BatchNorm included) on 1, 2 and 4
devices from the same state and global batch; then a 4th step whose batch holds a NaN in the
last device's shard only, which every device must skip alike (the divergence guard). Prints
RESULT {case: differences} as JSON. (Stage 4, with R1, on 4 devices of 2 processes against 1
device: test_multiprocess.py.)

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_equivalence.py
"""
import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tiny_config import tiny_training  # beside this script

from grain_jax.train import initial_weights, optim
from grain_jax.train.step import create_training


def _host(state):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(jax.device_get(
      (optim.model_params(state.params), optim.model_params(state.d_params),
       state.d_batch_stats)))]


def run(cfg, variables, d_variables, loss_vars, n):
  """Parameters and last metrics after 3 steps on the first n devices, and whether a 4th
  step with a NaN in the last shard left every parameter as it was."""
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  training = create_training(cfg, variables, d_variables, loss_vars, mesh)
  state, lv = training.state, jax.device_put(loss_vars, NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  batch = lambda: {k: rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32) for k in "xy"}
  put = lambda b: {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in b.items()}
  for _ in range(3):
    state, metrics = training.step(state, put(batch()), lv)
  before = _host(state)
  bad = batch()
  bad["x"][-1, 0, 0, 0] = np.nan  # the last example: on the last device
  state, nan_metrics = training.step(state, put(bad), lv)
  kept = all(np.array_equal(a, b) for a, b in zip(before, _host(state)))
  m = {k: float(v) for k, v in metrics.items()}
  m.update(nan_step_kept=kept, nan_step_nonfinite=float(nan_metrics["nonfinite"]),
           step_after=int(state.step))
  return before, m


def main():
  cfg = tiny_training("invrrdb", **{"loss.lpips": 0.8})
  v, dv, lv, _ = initial_weights.initial_variables(cfg)
  ref, ref_m = run(cfg, v, dv, lv, 1)
  scale = max(float(np.abs(a).max()) for a in ref)
  out = {}
  for n in (2, 4):
    got, m = run(cfg, v, dv, lv, n)
    out[f"invrrdb/{n}"] = dict(
        max_diff=max(float(np.abs(a - b).max()) for a, b in zip(ref, got)), scale=scale,
        loss=(ref_m["loss"], m["loss"]), d_loss=(ref_m["d_loss"], m["d_loss"]),
        nan_step=[(r["nan_step_kept"], r["nan_step_nonfinite"], r["step_after"])
                  for r in (ref_m, m)])
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
