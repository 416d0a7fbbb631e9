"""Run by test_training.py in a subprocess with 4 simulated CPU devices: the same 3 training
steps (discriminator and R1 updates included) on 1, 2 and 4 devices from the same state and
global batch. Prints RESULT {case: differences} as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_equivalence.py
"""
import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tiny_config import tiny_training  # beside this script

from grain_jax import optim, train_step, trainer


def run(cfg, variables, d_variables, loss_vars, n):
  """Parameters and last metrics after 3 steps on the first n devices."""
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  training = train_step.create_training(cfg, variables, d_variables, loss_vars, mesh)
  state, lv = training.state, jax.device_put(loss_vars, NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  for _ in range(3):
    b = {k: jax.device_put(rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
                           NamedSharding(mesh, P("data"))) for k in ("x", "y")}
    state, metrics = training.step(state, b, lv)
  leaves = jax.tree_util.tree_leaves(jax.device_get(
      (optim.model_params(state.params), optim.model_params(state.d_params),
       state.d_batch_stats)))
  return [np.asarray(a) for a in leaves], {k: float(v) for k, v in metrics.items()}


def main():
  out = {}
  for stage, over, sizes in (("invrrdb", {"loss.lpips": 0.8}, (1, 2)),
                             ("finetune", {"model.discriminator.stddev_group": 1}, (1, 4))):
    cfg = tiny_training(stage, **over)
    v, dv, lv, _ = trainer.initial_variables(cfg)
    ref, ref_m = run(cfg, v, dv, lv, 1)
    for n in sizes[1:]:
      got, m = run(cfg, v, dv, lv, n)
      scale = max(float(np.abs(a).max()) for a in ref)
      out[f"{stage}/{n}"] = dict(
          max_diff=max(float(np.abs(a - b).max()) for a, b in zip(ref, got)), scale=scale,
          loss=(ref_m["loss"], m["loss"]), d_loss=(ref_m["d_loss"], m["d_loss"]),
          r1=(ref_m["r1"], m["r1"]))
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
