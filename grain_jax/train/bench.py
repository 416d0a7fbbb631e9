"""Speed and memory of GRAIN on this machine's first JAX device.

    grain-jax bench                         # 1024 config: rescale + all four stages
    grain-jax bench --config small --batch_sizes 1,4,16
    grain-jax bench --compute_dtype bfloat16 --remat --json

Everything is measured after compilation (the median of --repeats calls), with random
weights of the config's shapes (the cost does not depend on the values):
  * downscale / upscale: images per second at each batch size;
  * training: seconds per step of each stage with its loss terms (GRAIN's; --losses picks
    others), the discriminator update not included (it runs every d_every steps;
    --d_update also times a step that includes it, R1 too; --guard_cost also times the step
    without the divergence guard, to show what skipping non-finite steps costs), with the
    config's model.conv_weight_grad (Options.conv_weight_grad sets another);
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

`--topology v5e:2x2` instead compiles every program for a Cloud TPU slice on this host
(train/aot.py): per-chip HBM plan, fit, FLOPs, time at peak, compile time; `--max_batch`
finds the largest per-chip batch that fits.
"""
from __future__ import annotations

import dataclasses
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from grain_jax import inference
from grain_jax.data import sources
from grain_jax.eval.evaluate import evaluate
from grain_jax.eval.evaluator import Evaluator
from grain_jax.nets import layers, registry
from grain_jax.nets.model import GRAIN, placeholder_values, placeholder_variables
from grain_jax.nets.model_config import grain_1024
from grain_jax.train import stages
from grain_jax.train.config import training_config
from grain_jax.train.losses import LOSSES, loss_networks
from grain_jax.train.step import create_training


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
  """FLOPs of a lowered program (or the sum over a list of them), from XLA's cost analysis of
  its HLO before backend optimisation (a GPU's compiled program hides its convolutions in
  library calls)."""
  if isinstance(lowered, list):
    return sum(program_flops(low) for low in lowered)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def compiled_memory_gb(compiled) -> float | None:
  """XLA's memory estimate of a compiled program (the largest of a list of them, which run
  one after the other)."""
  if isinstance(compiled, list):
    sizes = [g for g in map(compiled_memory_gb, compiled) if g is not None]
    return max(sizes) if sizes else None
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
  model = GRAIN.from_config(cfg)
  hr, lr_size = int(cfg.hr_size), int(cfg.lr_size)
  variables = jax.device_put(placeholder_variables(model))
  down, up = map(jax.jit, inference.rescale_functions(model,
                                                      int(cfg.get("inference_chunk", 0))))
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


def _time_steps(step, state, batch, loss_vars, repeats: int, reset_step: bool):
  """Median seconds of a compiled training step (repeats=0: the first call); its last loss."""
  t = time.perf_counter()
  state, m = step(state, batch, loss_vars)  # warm-up (the state is donated)
  jax.block_until_ready(m)
  times = [time.perf_counter() - t] if repeats == 0 else []
  for _ in range(repeats):
    if reset_step:
      state = state.replace(step=jnp.zeros((), jnp.int32))  # D update and R1 again
    t = time.perf_counter()
    state, m = step(state, batch, loss_vars)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return float(np.median(times)), float(m["loss"])


def bench_train(cfg, stage_names, batch: int, ceiling: float, repeats: int, d_update: bool,
                log, losses=None, compile_only: bool = False,
                guard_cost: bool = False) -> list[dict]:
  """One case per stage (and per variant: with the D update too if d_update; without the
  divergence guard too if guard_cost)."""
  hr = int(cfg.hr_size)
  variables = placeholder_variables(GRAIN.from_config(cfg))
  loss_vars = {n: placeholder_values(registry.expected_variables(n, cfg))
               for n in loss_networks({k: 1.0 for k in losses or LOSSES})}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rng = np.random.default_rng(0)
  batch_arrays = {k: rng.uniform(-1, 1, (batch, hr, hr, 3)).astype(np.float32) for k in "xy"}
  cases = []
  for name in stage_names:
    tcfg = training_config(name, model=cfg)
    if losses is not None:  # those on at their weight (1 where it is 0: the time does not
      # depend on it), the others off; None: the stage's own (GRAIN's) terms
      tcfg.loss.update({k: (v or 1.0) if k in losses else 0.0 for k, v in tcfg.loss.items()})
    d_name = stages.get(name).discriminator
    d_vars = placeholder_values(registry.expected_variables(d_name, cfg))
    variants = ([("", 0, True)] + ([("_with_d", 1, True)] if d_update else [])
                + ([("_unguarded", 0, False)] if guard_cost else []))
    for suffix, d_every, guard in variants:
      tcfg.d_every = d_every  # 0: no D update; 1: at every step (R1 too at step 0)
      training = create_training(tcfg, variables, d_vars, loss_vars, mesh, guard)
      try:
        t = time.perf_counter()
        # The D, R1 and G programs of step 0 (all three with d_every=1).
        lowered, compiled = training.step.compile(training.state, batch_arrays, loss_vars)
        compile_s = time.perf_counter() - t
        seconds, loss = None, 0.0
        if not compile_only:
          seconds, loss = _time_steps(training.step, training.state, batch_arrays, loss_vars,
                                      repeats, bool(d_every))
      except Exception as e:
        cases.append(dict(name=f"train_{name}", batch=batch, error=f"{type(e).__name__}: "
                          f"{str(e)[:200]}"))
        log(f"  train {name} batch {batch}: {cases[-1]['error']}")
        continue
      case = _case(f"train_{name}{suffix}", batch, seconds, program_flops(lowered), ceiling,
                   compiled, per="step")
      case["compile_s"] = compile_s
      if not np.isfinite(loss):
        case["error"] = "loss is not finite"
      cases.append(case)
      log(row(case))
  return cases


def precision_effect(checkpoint: str, data: str, max_images: int, log) -> dict:
  """hr / hr_inv / hr_gan PSNR of trained weights on real images in float32 and bfloat16."""
  out = dict(checkpoint=checkpoint, data=data)
  for dtype in ("float32", "bfloat16"):
    loaded = inference.load(checkpoint, dtype)
    ev = Evaluator(loaded.model, loaded.variables)
    with tempfile.TemporaryDirectory() as tmp:
      m = evaluate(ev, sources.open_source(data), tmp, max_images=max_images, progress=False)
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


@dataclasses.dataclass
class Options:
  """What `run` measures (the `grain-jax bench` options)."""
  config: str = "1024"           # the --config it came from, for the record
  model: ml_collections.ConfigDict | None = None  # its model config; None: 1024
  batch_sizes: tuple = (1,)      # of downscale / upscale (() skips them)
  stages: tuple = stages.NAMES   # training stages to time (() skips training)
  train_batch: int = 1           # global batch of the training steps
  compute_dtype: str = "float32"
  remat: bool = False
  repeats: int = 3               # timed calls per case (0: time the first call)
  d_update: bool = False         # also time a step with the discriminator update
  guard_cost: bool = False       # also time each step without the divergence guard
  losses: tuple | None = None    # loss terms of the training steps (None: each stage's own)
  conv_weight_grad: str | None = None  # layers.CONV_WEIGHT_GRAD; None: the config's
  compile_only: bool = False     # FLOPs and XLA's memory estimate only
  checkpoint: str = ""           # with data: hr PSNR in float32 vs bfloat16
  data: str = ""
  max_images: int = 16


def run(options: Options = Options(), log=print) -> dict:
  """Runs the benchmark; returns the JSON-able result (see the module docstring)."""
  o = options
  if min(o.batch_sizes + (o.train_batch,)) < 1 or o.repeats < 0:
    raise ValueError("batch sizes must be >= 1 and --repeats >= 0")
  if bool(o.checkpoint) != bool(o.data):
    raise ValueError("--checkpoint and --data go together")
  # A copy, unlocked, for the run options to be set.
  cfg = ml_collections.ConfigDict((o.model or grain_1024()).to_dict())
  cfg.compute_dtype = o.compute_dtype
  cfg.remat = o.remat
  if o.conv_weight_grad is not None:
    cfg.conv_weight_grad = o.conv_weight_grad
  wgrad = layers.conv_weight_grad_of(cfg)
  ceiling = conv_ceiling(jnp.dtype(o.compute_dtype), o.repeats)
  result = dict(device=device_description(), config=o.config, hr_size=int(cfg.hr_size),
                lr_size=int(cfg.lr_size), compute_dtype=o.compute_dtype, remat=o.remat,
                scan_blocks=bool(cfg.get("scan_blocks", False)),
                remat_per_example=bool(cfg.get("remat_per_example", False)),
                inference_chunk=int(cfg.get("inference_chunk", 0)),
                conv_weight_grad=wgrad, compile_only=o.compile_only,
                jax_version=jax.__version__, ceiling_tflops=ceiling["tflops"], ceiling=ceiling,
                cases=[])
  log(f"{result['device']}; GRAIN {cfg.hr_size} <-> {cfg.lr_size}, {o.compute_dtype}"
      f"{', remat' if o.remat else ''}, conv weight gradients: {wgrad}")
  log(f"ceiling: one {ceiling['shape']} convolution, {ceiling['tflops']:.3f} TFLOP/s "
      f"({o.compute_dtype})")
  log(HEADER)
  if o.batch_sizes:
    result["cases"] += bench_rescale(cfg, o.batch_sizes, ceiling["tflops"], o.repeats, log,
                                     o.compile_only)
  if o.stages:
    result["cases"] += bench_train(cfg, o.stages, o.train_batch, ceiling["tflops"], o.repeats,
                                   o.d_update, log, o.losses, o.compile_only, o.guard_cost)
  if o.checkpoint:
    result["precision"] = precision_effect(o.checkpoint, o.data, o.max_images, log)
  return result

