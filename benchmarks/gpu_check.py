"""The GPU check: GRAIN at 1024 on one accelerator, in one command, inside a time budget.

    python benchmarks/gpu_check.py [--budget_s 420] [--json_out FILE]

Runs, most important (least measured) first, and skips what the budget no longer allows:
  1. the convolution ceilings (float32, bfloat16);
  2. a stage-4 (fine-tuning) training step at 1024, bfloat16 with remat, batch 4 (the batch
     the README promises for an 80 GB GPU);
  3. upscale and downscale at batch 1 in float32 and in bfloat16;
  4. upscale at the largest batch that fits, estimated from the batch-1 memory, per dtype;
  5. the same stage-4 step without remat, compiled only: XLA's memory plan, to set against
     step 2's (what remat saves; XLA:CPU merges remat away, so only an accelerator shows it);
  6. the stage-4 step in float32 without remat at batch 1.
A stage-4 step compiles for minutes on a GPU: give the check a fresh lease and --budget_s
near the lease's limit.
Prints one table at the end (rows also appear as they finish) and writes the JSON of every
case to --json_out.
"""
import argparse
import json
import os
import sys
import time

# Let XLA take most of the GPU (its default is 75%): the largest batches need it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from grain_jax.cli import config_flags  # noqa: E402
from grain_jax.train import bench  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--budget_s", type=float, default=420.0)
  p.add_argument("--config", default="1024")
  p.add_argument("--json_out", default="")
  p.add_argument("--max_batch", type=int, default=64)
  a = p.parse_args()
  t0 = time.perf_counter()
  left = lambda: a.budget_s - (time.perf_counter() - t0)
  log = lambda s: print(s, flush=True)
  cfg = ml_collections.ConfigDict(config_flags.load(a.config).model.to_dict())  # unlocked
  rows, ceilings = [], {}
  log(bench.device_description())
  for dt in ("float32", "bfloat16"):
    ceilings[dt] = bench.conv_ceiling(jnp.dtype(dt), 5)["tflops"]
    log(f"ceiling {dt}: {ceilings[dt]:.4g} TFLOP/s")

  def configured(dtype, remat=False):
    c = cfg.copy_and_resolve_references()
    c.compute_dtype, c.remat = dtype, remat
    return c

  def add(cases, dtype, remat=False):
    for c in cases:
      c.update(compute_dtype=dtype, remat=remat)
      rows.append(c)

  def dump():
    if a.json_out:
      with open(a.json_out, "w") as f:
        json.dump(dict(device=bench.device_description(), ceilings_tflops=ceilings,
                       config=a.config, cases=rows), f, indent=1)

  plan = [
      ("train", "bfloat16", True, 4),
      ("rescale", "float32", False, 1), ("rescale", "bfloat16", False, 1),
      ("rescale_max", "bfloat16", False, None), ("rescale_max", "float32", False, None),
      ("train_plan", "bfloat16", False, 4), ("train", "float32", False, 1),
  ]
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2 ** 30
  for kind, dtype, remat, batch in plan:
    if left() < 60:
      log(f"skipped {kind} {dtype} (time budget)")
      continue
    c = configured(dtype, remat)
    log(f"--- {kind} {dtype}{' remat' if remat else ''} ({left():.0f} s left)")
    if kind == "rescale":
      add(bench.bench_rescale(c, [batch], ceilings[dtype], 3, log), dtype)
    elif kind in ("train", "train_plan"):
      add(bench.bench_train(c, ["finetune"], batch, ceilings[dtype], 3, False, log,
                            compile_only=kind == "train_plan"), dtype, remat)
    else:
      one = [r for r in rows if r["name"] == "upscale" and r["batch"] == 1
             and r["compute_dtype"] == dtype and r.get("xla_memory_gb")]
      if not one or not limit:
        continue
      per_image = one[0]["xla_memory_gb"]
      b = int(min(a.max_batch, max(2, 0.8 * limit // per_image)))
      add(bench.bench_rescale(c, [b], ceilings[dtype], 3, log), dtype)
    dump()
  log("")
  log(f"GRAIN {cfg.hr_size} on {bench.device_description()}; ceilings "
      + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in ceilings.items()))
  log(bench.HEADER + "  dtype")
  for r in rows:
    log(bench.row(r) + f"  {r['compute_dtype']}{' remat' if r['remat'] else ''}")
  log(f"total {time.perf_counter() - t0:.0f} s")
  dump()


if __name__ == "__main__":
  main()
