"""Speed and memory of GRAIN on this machine's first JAX device.

    python -m grain_jax.bench                         # 1024 config: rescale + all four stages
    python -m grain_jax.bench --config small --batch_sizes 1,4,16
    python -m grain_jax.bench --compute_dtype bfloat16 --remat --json

Everything is measured after compilation (the median of --repeats calls), with random
weights of the config's shapes (the cost does not depend on the values):
  * downscale / upscale: images per second at each batch size;
  * training: seconds per step of each stage, every loss on (L2, LR-L2, LPIPS, identity,
    adversarial; --losses picks fewer), the discriminator update not included (it runs every d_every steps;
    --d_update also times a step that includes it, R1 too);
  * FLOPs per image from XLA's cost analysis of the program (its HLO, as lowered), the TFLOP/s this
    achieves, and the TFLOP/s of one large 3x3 convolution timed on the same device in the
    same run: its ratio (fraction_of_ceiling) is what stays comparable across busy machines;
  * memory: XLA's estimate for the compiled program (arguments + outputs + temporaries)
    and the peak so far: bytes in use on a GPU/TPU, the process's resident memory on CPU.
  * --compile_only: no timing, just the FLOPs and XLA's memory estimate of each program (for
    programs too big or too slow to run on this machine, e.g. stage 4 at 1024 on a CPU);
  * with --checkpoint and --data: hr PSNR of those weights on those images in float32 and
    in bfloat16 (the numerical effect of mixed precision).
`--json` prints one JSON object instead of the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_NAMES = ("invrrdb", "fea2code", "fusion", "finetune")


def model_config(name: str):
  """'1024', 'small' or the path of a config file (get_config().model or model_config())."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  if name == "1024":
    from configs import grain_1024
    return grain_1024.model_config()
  if name == "small":
    from configs import grain_small
    return grain_small.model_config()
  if not os.path.exists(name):
    raise FileNotFoundError(f"--config: no such file {name!r} (or use '1024' / 'small')")
  spec = importlib.util.spec_from_file_location("bench_config", name)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if hasattr(mod, "model_config"):
    return mod.model_config()
  cfg = mod.get_config()
  return cfg.model if "model" in cfg else cfg


def device_description() -> str:
  d = jax.devices()[0]
  n = len(jax.local_devices())
  return f"{d.platform}: {d.device_kind} (1 of {n} local device{'s' if n > 1 else ''})"


def timed(fn, args, repeats: int) -> float:
  """Median wall seconds of fn(*args) over `repeats` calls, after one warm-up call
  (repeats=0: the first call itself, for cases too slow to run twice)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  if repeats == 0:
    return time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def program_flops(lowered) -> float:
  """FLOPs of a lowered program, from XLA's cost analysis of its HLO before backend
  optimisation (a GPU's compiled program hides its convolutions in library calls)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def compiled_memory_gb(compiled) -> float | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 30


def device_peak_gb() -> float | None:
  """Peak bytes in use on the device so far; on CPU (which reports none) the process's peak
  resident memory, compilation included."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None and jax.devices()[0].platform == "cpu":
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
  return None if peak is None else peak / 2 ** 30


def conv_ceiling(dtype, repeats: int) -> dict:
  """TFLOP/s of one large NHWC 3x3 convolution (what the networks are made of)."""
  on_cpu = jax.devices()[0].platform == "cpu"
  n, hw, c = (2, 256, 64) if on_cpu else (16, 512, 128)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, hw, hw, c)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 3, c, c)) * 0.05, dtype)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  flops = 2.0 * 9 * c * c * hw * hw * n
  t = timed(conv, (x, w), max(3, repeats))
  return dict(shape=f"{n}x{hw}x{hw}x{c} -> {c}, 3x3", tflop=flops / 1e12, seconds=t,
              tflops=flops / t / 1e12)


def _case(name, batch, seconds, flops, ceiling, compiled, per="image") -> dict:
  """One measured case; seconds=None for a program compiled but not run (--compile_only)."""
  out = dict(name=name, batch=batch)
  if seconds is None:
    return dict(out, compiled_only=True, tflop_per_image=flops / batch / 1e12,
                xla_memory_gb=compiled_memory_gb(compiled), peak_device_gb=device_peak_gb())
  if per == "image":
    out["images_per_s"] = batch / seconds
  out["step_s" if per == "step" else "seconds"] = seconds
  out["tflop_per_image"] = flops / batch / 1e12
  out["achieved_tflops"] = flops / seconds / 1e12
  out["fraction_of_ceiling"] = out["achieved_tflops"] / ceiling
  out["xla_memory_gb"] = compiled_memory_gb(compiled)
  out["peak_device_gb"] = device_peak_gb()
  return out


def bench_rescale(cfg, batch_sizes, ceiling: float, repeats: int, log,
                  compile_only: bool = False) -> list[dict]:
  from grain_jax.model import GRAIN, placeholder_variables

  model = GRAIN.from_config(cfg)
  hr, lr_size = int(cfg.hr_size), int(cfg.lr_size)
  variables = jax.device_put(placeholder_variables(model, hr))
  down = jax.jit(lambda v, x: model.apply(v, x, method=model.downscale))
  up = jax.jit(lambda v, lr: model.apply(v, lr, method=model.upscale))
  cases = []
  for b in batch_sizes:
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (b, hr, hr, 3)), jnp.float32)
    for name, fn, arg in (("downscale", down, x),
                          ("upscale", up, jnp.zeros((b, lr_size, lr_size, 3), jnp.float32))):
      try:
        t = time.perf_counter()
        lowered = fn.lower(variables, arg)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t
        seconds = None if compile_only else timed(compiled, (variables, arg), repeats)
      except Exception as e:  # e.g. out of memory at a large batch: report, go on
        cases.append(dict(name=name, batch=b, error=f"{type(e).__name__}: {str(e)[:200]}"))
        log(f"  {name} batch {b}: {cases[-1]['error']}")
        continue
      case = _case(name, b, seconds, program_flops(lowered), ceiling, compiled)
      case["compile_s"] = compile_s
      cases.append(case)
      log(row(case))
  return cases


LOSSES = ("l2", "lr_l2", "lpips", "id", "adv")


def bench_train(cfg, stages, batch: int, ceiling: float, repeats: int, d_update: bool,
                log, losses=LOSSES, compile_only: bool = False) -> list[dict]:
  from configs.training import training_config
  from grain_jax import irse50, optim, trainer
  from grain_jax.lpips import LPIPS
  from grain_jax.model import GRAIN, NETWORKS, placeholder_tree, placeholder_variables
  from grain_jax.train_step import (build_discriminator, get_stage, make_parallel_step,
                                    make_train_step)

  hr = int(cfg.hr_size)
  all_vars = placeholder_variables(GRAIN.from_config(cfg), hr)
  loss_vars = {"lpips": placeholder_tree(LPIPS().init, (1, 64, 64, 3), (1, 64, 64, 3)),
               "irse50": placeholder_tree(irse50.IRSE50().init, (1, 112, 112, 3))}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rng = np.random.default_rng(0)
  batch_arrays = {k: rng.uniform(-1, 1, (batch, hr, hr, 3)).astype(np.float32) for k in "xy"}
  cases = []
  for name in stages:
    tcfg = training_config(name, model=cfg)
    for k in LOSSES:
      if k not in losses:
        tcfg.loss[k] = 0.0
    stage = get_stage(name)
    kw = {"train": False} if stage.discriminator == "patch" else {}
    d_vars = placeholder_tree(lambda k, x: build_discriminator(tcfg, stage, None).init(k, x, **kw),
                       (1, hr, hr, 3))
    tx = optim.make_optimizer(tcfg.optimizer, tcfg.learning_rate)
    variables = {"params": {n: all_vars["params"][n] for n in NETWORKS},
                 "buffers": all_vars["buffers"]}
    model = GRAIN.from_config(cfg, stage.runs)
    variants = [("step", 0)] + ([("step_with_d_update", 1)] if d_update else [])
    for label, d_every in variants:
      tcfg.d_every = d_every  # 0: no D update in the program; 1: at every step (R1 at step 0)
      disc = build_discriminator(tcfg, stage)
      step = make_parallel_step(make_train_step(tcfg, model, disc, tx, tx, set(loss_vars)), mesh)
      state = trainer.create_train_state(tcfg, variables, d_vars, tx, tx)
      try:
        t = time.perf_counter()
        lowered = step.lower(state, batch_arrays, loss_vars)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t
        flops = program_flops(lowered)
        if compile_only:
          case = _case(f"train_{name}" + ("" if label == "step" else "_with_d"), batch, None,
                       flops, ceiling, compiled, per="step")
          cases.append(dict(case, compile_s=compile_s))
          log(row(cases[-1]))
          continue
        t = time.perf_counter()
        state, m = compiled(state, batch_arrays, loss_vars)  # warm-up (state is donated)
        jax.block_until_ready(m)
        times = [time.perf_counter() - t] if repeats == 0 else []
        for _ in range(repeats):
          if d_every:
            state = state.replace(step=jnp.zeros((), jnp.int32))  # D update and R1
          t = time.perf_counter()
          state, m = compiled(state, batch_arrays, loss_vars)
          jax.block_until_ready(m)
          times.append(time.perf_counter() - t)
        del state
      except Exception as e:
        cases.append(dict(name=f"train_{name}", batch=batch, error=f"{type(e).__name__}: "
                          f"{str(e)[:200]}"))
        log(f"  train {name} batch {batch}: {cases[-1]['error']}")
        continue
      case = _case(f"train_{name}" + ("" if label == "step" else "_with_d"), batch,
                   float(np.median(times)), flops, ceiling, compiled, per="step")
      case["compile_s"] = compile_s
      if not np.isfinite(float(m["loss"])):
        case["error"] = "loss is not finite"
      cases.append(case)
      log(row(case))
  return cases


def precision_effect(checkpoint: str, data: str, max_images: int, log) -> dict:
  """hr / hr_inv / hr_gan PSNR of trained weights on real images in float32 and bfloat16."""
  import tempfile

  from grain_jax import api, data as data_lib, evaluate

  out = dict(checkpoint=checkpoint, data=data)
  for dtype in ("float32", "bfloat16"):
    grain = api.load(checkpoint, dtype)
    ev = evaluate.Evaluator(grain, None, None)
    with tempfile.TemporaryDirectory() as tmp:
      m = evaluate.evaluate(ev, data_lib.open_source(data), tmp, max_images=max_images,
                            progress=False)
    out[dtype] = {k: m[k] for k in ("num_images", "hr_psnr", "hr_inv_psnr", "hr_gan_psnr",
                                    "hr_ssim")}
  out["hr_psnr_change_db"] = out["bfloat16"]["hr_psnr"] - out["float32"]["hr_psnr"]
  log(f"precision: hr PSNR {out['float32']['hr_psnr']:.3f} dB (float32) -> "
      f"{out['bfloat16']['hr_psnr']:.3f} dB (bfloat16), {out['hr_psnr_change_db']:+.3f} dB; "
      f"hr_inv {out['float32']['hr_inv_psnr']:.3f} -> {out['bfloat16']['hr_inv_psnr']:.3f}; "
      f"{out['float32']['num_images']} images of {data}")
  return out


def row(c: dict) -> str:
  if "error" in c and "tflop_per_image" not in c:
    return f"  {c['name']:<24} {c['batch']:>5}  {c['error']}"
  mem = c.get("xla_memory_gb") or c.get("peak_device_gb")
  mem_s = f"{mem:7.2f}" if mem is not None else "      -"
  if c.get("compiled_only"):
    return (f"  {c['name']:<24} {c['batch']:>5} {'compiled only':>16} "
            f"{c['tflop_per_image']:9.3f} {'-':>9} {'-':>7} {mem_s}")
  rate = (f"{c['images_per_s']:10.3f} img/s" if "images_per_s" in c
          else f"{c['step_s']:10.3f} s/step")
  return (f"  {c['name']:<24} {c['batch']:>5} {rate} {c['tflop_per_image']:9.3f} "
          f"{c['achieved_tflops']:9.3f} {100 * c['fraction_of_ceiling']:6.1f}% {mem_s}")


HEADER = (f"  {'case':<24} {'batch':>5} {'rate':>16} {'TFLOP/img':>9} {'TFLOP/s':>9} "
          f"{'ceil%':>7} {'mem GB':>7}")


def run(config: str = "1024", batch_sizes=(1,), stages=STAGE_NAMES, train_batch: int = 1,
        compute_dtype: str = "float32", remat: bool = False, repeats: int = 3,
        d_update: bool = False, checkpoint: str = "", data: str = "", max_images: int = 16,
        losses=LOSSES, compile_only: bool = False, log=print) -> dict:
  """Runs the benchmark; returns the JSON-able result (see the module docstring)."""
  cfg = model_config(config)
  cfg.compute_dtype = compute_dtype
  cfg.remat = remat
  ceiling = conv_ceiling(jnp.dtype(compute_dtype), repeats)
  result = dict(device=device_description(), config=config, hr_size=int(cfg.hr_size),
                lr_size=int(cfg.lr_size), compute_dtype=compute_dtype, remat=remat,
                compile_only=compile_only, jax_version=jax.__version__,
                ceiling_tflops=ceiling["tflops"], ceiling=ceiling, cases=[])
  log(f"{result['device']}; GRAIN {cfg.hr_size} <-> {cfg.lr_size}, {compute_dtype}"
      f"{', remat' if remat else ''}")
  log(f"ceiling: one {ceiling['shape']} convolution, {ceiling['tflops']:.3f} TFLOP/s "
      f"({compute_dtype})")
  log(HEADER)
  if batch_sizes:
    result["cases"] += bench_rescale(cfg, batch_sizes, ceiling["tflops"], repeats, log,
                                     compile_only)
  if stages:
    result["cases"] += bench_train(cfg, stages, train_batch, ceiling["tflops"], repeats,
                                   d_update, log, losses, compile_only)
  if checkpoint:
    result["precision"] = precision_effect(checkpoint, data, max_images, log)
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m grain_jax.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="1024",
                 help="'1024' (the published GRAIN), 'small' (the demo's 64 <-> 4 model) or a "
                      "config file with a model config")
  p.add_argument("--batch_sizes", default="1",
                 help="comma-separated batch sizes for downscale/upscale ('' skips them)")
  p.add_argument("--stages", default=",".join(STAGE_NAMES),
                 help="training stages to time ('' skips training)")
  p.add_argument("--train_batch", type=int, default=1, help="global batch of the training step")
  p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--remat", action="store_true", help="rematerialise the heavy blocks")
  p.add_argument("--losses", default=",".join(LOSSES),
                 help="loss terms of the timed training step (default: all, as in training)")
  p.add_argument("--d_update", action="store_true",
                 help="also time a training step that includes the discriminator update")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed calls per case, after a warm-up call (median); 0 times the first "
                      "call (compilation is never timed: programs are compiled ahead)")
  p.add_argument("--compile_only", action="store_true",
                 help="compile every program and report its FLOPs and XLA's memory estimate "
                      "without running it (for programs too big or slow for this machine)")
  p.add_argument("--checkpoint", default="",
                 help="trained weights (or a training workdir): also measure hr PSNR on --data "
                      "in float32 and bfloat16 (the numerical effect of mixed precision)")
  p.add_argument("--data", default="", help="image folder or tfds:NAME/SPLIT for --checkpoint")
  p.add_argument("--max_images", type=int, default=16, help="images for --checkpoint")
  p.add_argument("--json", action="store_true", help="print one JSON object, no table")
  a = p.parse_args(argv)
  try:
    sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
  except ValueError:
    p.error("--batch_sizes must be comma-separated integers")
  bad = [s for s in stages if s not in STAGE_NAMES]
  if bad:
    p.error(f"--stages: unknown {bad}; choose from {', '.join(STAGE_NAMES)}")
  if min(sizes + [a.train_batch]) < 1 or a.repeats < 0:
    p.error("batch sizes must be >= 1 and --repeats >= 0")
  losses = [k.strip() for k in a.losses.split(",") if k.strip()]
  if set(losses) - set(LOSSES) or not losses:
    p.error(f"--losses: choose from {', '.join(LOSSES)}")
  if bool(a.checkpoint) != bool(a.data):
    p.error("--checkpoint and --data go together")
  log = (lambda *_: None) if a.json else (lambda s: print(s, flush=True))
  try:
    result = run(a.config, sizes, stages, a.train_batch, a.compute_dtype, a.remat, a.repeats,
                 a.d_update, a.checkpoint, a.data, a.max_images, losses, a.compile_only, log)
  except (OSError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.json:
    print(json.dumps(result, indent=1))
  return 1 if any("error" in c for c in result["cases"]) else 0


if __name__ == "__main__":
  sys.exit(main())
