"""Ahead-of-time compilation of every GRAIN program for a Cloud TPU slice, on any host with
libtpu: `grain-jax bench --topology v5e:2x2`.

The programs are the ones a real run compiles, with the config's shapes and dtypes and no
weights: downscale and upscale (`grain-jax down|up`, data-parallel over the chips) and each
training stage's three step programs (train/step.py: the discriminator update `d`, its lazy
R1 update `r1` and the trained networks' update `g`), with GRAIN's loss terms, data-parallel
over all the slice's chips. Each is lowered with jax.ShapeDtypeStructs sharded over a mesh
of the topology's compile-only devices (util/tpu.py) and compiled by the TPU compiler, in a
child process of its own (util/isolated.py), which gives:
  * the per-chip HBM plan (arguments, outputs, temporaries, aliased, code) against the chip's
    HBM, and whether it fits (the compiler refuses a program that does not, within a minute,
    saying how much it needed; a plan it accepts above the chip's HBM is reported as
    'over HBM' and counts as not fitting);
  * TFLOP per chip and call, and the time that takes at the chip's bf16 peak (a lower bound);
  * the compile seconds and the compiler's peak host memory (a compile that passes
    `memory_limit_gb` or `timeout_s` is stopped and reported as such).
With `max_batch` each program group (downscale, upscale, a stage's d + r1 + g) is compiled at
doubling per-chip batches until one does not fit (halving if the first does not): the
largest batch of the form start * 2^k that fits.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax.inference import rescale_functions
from grain_jax.nets import layers, registry
from grain_jax.nets.model import GRAIN
from grain_jax.nets.model_config import grain_1024
from grain_jax.train import stages
from grain_jax.train.config import training_config
from grain_jax.train.losses import loss_networks
from grain_jax.train.step import create_training
from grain_jax.util import isolated, tpu

GIB = 2 ** 30
# A case's status when its compile ran to a verdict (any other status: the compile failed).
VERDICTS = ("fits", "does not fit", "over HBM")


# ------------------------------------------------------------------------------ in the child

def _abstract(tree, sharding):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _model_config(spec: dict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(spec["model"])
  cfg.compute_dtype = spec["compute_dtype"]
  cfg.remat = spec["remat"]
  return layers.for_platform(cfg, "tpu")


def _lower(spec: dict, mesh) -> jax.stages.Lowered:
  """The program `spec` names, lowered for `mesh` with abstract inputs."""
  cfg = _model_config(spec)
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  n = spec["batch_per_chip"] * mesh.size
  hr, lr = int(cfg.hr_size), int(cfg.lr_size)
  if spec["program"] in ("downscale", "upscale"):
    model = GRAIN.from_config(cfg)
    variables = _abstract(jax.eval_shape(model.init, jax.random.key(0),
                                         jax.ShapeDtypeStruct((1, hr, hr, 3), jnp.float32)), rep)
    down, up = rescale_functions(model, int(cfg.get("inference_chunk", 0)), mesh.size)
    if spec["program"] == "downscale":
      return jax.jit(down).lower(variables, jax.ShapeDtypeStruct((n, hr, hr, 3), jnp.float32,
                                                                 sharding=data))
    fn = jax.jit(up)
    return fn.lower(variables, jax.ShapeDtypeStruct((n, lr, lr, 3), jnp.float32, sharding=data))
  tcfg = training_config(spec["stage"], model=cfg)
  if spec["losses"] is not None:  # as bench: those named at their weight (1 where it is 0)
    tcfg.loss.update({k: (v or 1.0) if k in spec["losses"] else 0.0
                      for k, v in tcfg.loss.items()})
  tcfg.d_every = tcfg.r1_every = 1  # step 0 then runs all three programs
  stage = stages.get(spec["stage"])
  variables = jax.eval_shape(GRAIN.from_config(cfg, stage.runs).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, hr, hr, 3), jnp.float32))
  d_vars = registry.expected_variables(stage.discriminator, cfg)
  loss_vars = {name: _abstract(registry.expected_variables(name, cfg), rep)
               for name in loss_networks(dict(tcfg.loss))}
  training = create_training(tcfg, variables, d_vars, loss_vars, mesh)
  batch = {k: jax.ShapeDtypeStruct((n, hr, hr, 3), jnp.float32, sharding=data) for k in "xy"}
  (lowered,) = training.step.lower(training.state, batch, loss_vars, only=(spec["program"],),
                                   step=0)
  return lowered


def _out_of_hbm(message: str) -> dict | None:
  """{'needed_gib', 'available_gib'} from the TPU compiler's out-of-memory error, else None."""
  unit = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10}
  m = (re.search(r"required for .*?\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)"
                 r"([KMGT])\)", message)
       or re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message))
  if m:
    return dict(needed_gib=float(m.group(1)) * unit[m.group(2)],
                available_gib=float(m.group(3)) * unit[m.group(4)])
  if "RESOURCE_EXHAUSTED" in message and "HBM" in message.upper():
    return dict(needed_gib=None, available_gib=None)
  return None


def program_spec(topology: str, model: ml_collections.ConfigDict, compute_dtype: str,
                 remat: bool, losses, program: str, stage: str | None, batch: int) -> dict:
  """What `compile_program` compiles, JSON-able: `program` (downscale, upscale, or a
  stage's d, r1, g) for `topology` at a per-chip batch; losses None: the stage's own."""
  return dict(topology=topology, model=model.to_dict(), compute_dtype=compute_dtype,
              remat=remat, losses=list(losses) if losses is not None else None,
              program=program, stage=stage, batch_per_chip=batch)


def compile_program(spec: dict) -> dict:
  """Lowers and compiles one program for the topology (what a child process runs); its
  memory plan and FLOPs, or how much HBM it lacked. JSON-able in and out."""
  mesh = tpu.mesh(tpu.parse(spec["topology"]))
  t = time.perf_counter()
  lowered = _lower(spec, mesh)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax's XlaRuntimeError; an HBM refusal is a result, not an error
    oom = _out_of_hbm(str(e))
    if oom is None:
      raise
    return dict(fits=False, lower_s=lower_s, compile_s=time.perf_counter() - t,
                reason=str(e).strip().splitlines()[0][:300], **oom)
  compile_s = time.perf_counter() - t
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  hbm = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             temporaries=m.temp_size_in_bytes, aliased=m.alias_size_in_bytes,
             generated_code=m.generated_code_size_in_bytes)
  hbm = {k: v / GIB for k, v in hbm.items()}
  hbm["total"] = (hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"]
                  + hbm["generated_code"])
  return dict(fits=True, lower_s=lower_s, compile_s=compile_s, hbm_gib=hbm,
              flops_per_chip=float((cost or {}).get("flops", 0.0)))


# ------------------------------------------------------------------------------ the parent

@dataclasses.dataclass
class Options:
  """What `run` compiles (the `grain-jax bench --topology` options)."""
  topology: str = "v5e:2x2"
  config: str = "1024"            # the --config it came from, for the record
  model: ml_collections.ConfigDict | None = None  # its model config; None: 1024
  batch_sizes: tuple = (1,)       # per-chip batches of downscale / upscale (() skips them)
  stages: tuple = stages.NAMES    # training stages (() skips training)
  train_batch: int = 1            # per-chip batch of the training steps
  compute_dtype: str = "bfloat16"
  remat: bool = False
  losses: tuple | None = None     # loss terms of the training steps (None: each stage's own)
  max_batch: bool = False         # search each group's largest batch from the smallest given
  max_batch_limit: int = 256      # ... or reaches this
  memory_limit_gb: float | None = None  # stop a compiler process at this resident memory
  timeout_s: float | None = None  # ... or after this long
  out: str = ""                   # also write the JSON here, after every program


def host_description() -> dict:
  """This host's CPU model, cores and memory (compile times depend on them)."""
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    with open("/proc/meminfo") as f:
      mem_gb = int(f.readline().split()[1]) / 2 ** 20
  except OSError:
    mem_gb = None
  return dict(cpu=cpu, cores=os.cpu_count(), memory_gb=mem_gb)


def default_memory_limit_gb() -> float | None:
  """90% of the memory available now: a compile that needs more is stopped before the
  kernel's out-of-memory killer picks a process."""
  try:
    with open("/proc/meminfo") as f:
      avail = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable"))
    return 0.9 * avail / 2 ** 20
  except (OSError, StopIteration):
    return None


def _groups(o: Options) -> list[tuple[str, str | None, tuple[str, ...], list[int]]]:
  """(group name, stage, programs, per-chip batches) in compile order. The g program first:
  it is the largest, so a batch where it does not fit skips the others."""
  out = [(p, None, (p,), sorted(o.batch_sizes)) for p in ("downscale", "upscale")
         if o.batch_sizes]
  for name in o.stages:
    progs = ("g", "d") if stages.get(name).discriminator == "patch_discriminator" else (
        "g", "d", "r1")
    out.append((f"train_{name}", name, progs, [o.train_batch]))
  return out


def _case(o: Options, topo: tpu.Topology, group: str, stage, program: str, batch: int,
          outcome: isolated.Outcome) -> dict:
  name = group if stage is None else f"{group}_{program}"
  case = dict(name=name, stage=stage, program=program, batch_per_chip=batch,
              global_batch=batch * topo.chips, host_seconds=outcome.seconds,
              host_peak_gb=outcome.peak_rss_gb)
  if outcome.status != "ok":
    last = outcome.error.splitlines()[-1] if outcome.error else ""
    if outcome.status == "memory":
      what = f"stopped at the host-memory limit ({o.memory_limit_gb:.1f} GB)"
    elif outcome.status == "timeout":
      what = f"stopped at the time limit ({o.timeout_s:.0f} s)"
    elif outcome.status == "killed":
      what = f"the compiler process was killed ({last or 'out of host memory?'})"
    else:
      what = f"failed: {last}"
    status = "host memory" if outcome.status in ("memory", "killed") else outcome.status
    return dict(case, status=status, error=what)
  r = outcome.result
  case.update(compile_s=r["compile_s"], lower_s=r["lower_s"])
  if not r["fits"]:
    return dict(case, status="does not fit", needed_gib=r["needed_gib"],
                chip_hbm_gib=r["available_gib"] or topo.chip.hbm_gib, reason=r["reason"])
  tflop = r["flops_per_chip"] / 1e12
  # The compiler sometimes accepts a plan whose arguments + temporaries exceed the chip's
  # HBM (seen on v5e near the limit); without a TPU to run it on, it does not count as fitting.
  status = "fits" if r["hbm_gib"]["total"] <= topo.chip.hbm_gib else "over HBM"
  return dict(case, status=status, hbm_gib=r["hbm_gib"], chip_hbm_gib=topo.chip.hbm_gib,
              tflop_per_chip=tflop, seconds_at_peak=tflop / topo.chip.bf16_tflops)


def largest_batch(status_at, start: int, limit: int) -> int | None:
  """The largest batch of the form start * 2^k (k may be negative, down to 1) at which
  status_at(batch) is 'fits', doubling from `start` while it fits (up to `limit`) or halving
  while it does not; 0 if not even 1 fits, None if a compile fails otherwise."""
  b, best = start, 0
  while True:
    status = status_at(b)
    if status == "fits":
      best = b
      if b < start or 2 * b > limit:  # came down to it, or at the limit
        return best
      b *= 2
    elif status == "does not fit":
      if best or b == 1:
        return best
      b //= 2
    else:
      return None


def row(c: dict) -> str:
  """One line of the table."""
  head = f"  {c['name']:<22} {c['batch_per_chip']:>5}"
  host = f"{c.get('compile_s', c['host_seconds']):8.0f} s {c['host_peak_gb'] or 0:6.1f} GB"
  if c["status"] in ("fits", "over HBM"):
    h = c["hbm_gib"]
    return (f"{head}  {c['status']:<11} {h['total']:6.2f} / {c['chip_hbm_gib']:.2f} GiB "
            f"(temp {h['temporaries']:6.2f}) {c['tflop_per_chip']:10.4g} "
            f"{1e3 * c['seconds_at_peak']:9.3g} {host}")
  if c["status"] == "does not fit":
    need = f"needs {c['needed_gib']:.2f}" if c["needed_gib"] else "needs more"
    return f"{head}  NO FIT      {need + ' of ' + format(c['chip_hbm_gib'], '.2f') + ' GiB':<37} {'':>20} {host}"
  return f"{head}  {c['status'].upper():<11} {c['error'][:58]:<58} {host}"


HEADER = (f"  {'program':<22} {'batch':>5}  {'status':<11} {'HBM plan per chip':<37} "
          f"{'TFLOP/chip':>10} {'ms@peak':>9} {'compile':>10} {'host mem':>9}")


def run(options: Options, log=print) -> dict:
  """Compiles the programs `options` names for its topology; returns the JSON-able result
  (see the module docstring). Raises ValueError on bad options or without libtpu."""
  o = options
  topo = tpu.parse(o.topology)
  if min(o.batch_sizes + (o.train_batch,)) < 1:
    raise ValueError("batch sizes must be >= 1")
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    raise ValueError("--topology needs libtpu, the TPU compiler: pip install "
                     "'grain-jax[tpu]'") from None
  if o.memory_limit_gb is None:
    o = dataclasses.replace(o, memory_limit_gb=default_memory_limit_gb())
  model = o.model if o.model is not None else grain_1024()
  result = dict(topology=topo.name, chips=topo.chips, device_kind=topo.chip.device_kind,
                chip_hbm_gib=topo.chip.hbm_gib, chip_bf16_tflops=topo.chip.bf16_tflops,
                config=o.config, hr_size=int(model.hr_size), lr_size=int(model.lr_size),
                compute_dtype=o.compute_dtype, remat=o.remat,
                scan_blocks=bool(model.get("scan_blocks", False)),
                remat_per_example=bool(model.get("remat_per_example", False)),
                inference_chunk=int(model.get("inference_chunk", 0)), conv_weight_grad=
                layers.conv_weight_grad_of(layers.for_platform(model, "tpu")),
                losses=list(o.losses) if o.losses else "each stage's own",
                jax_version=jax.__version__, libtpu_version=libtpu, host=host_description(),
                memory_limit_gb=o.memory_limit_gb, timeout_s=o.timeout_s, cases=[],
                max_batch={} if o.max_batch else None)
  tpu.quiet_libtpu()  # for the compiler processes, which inherit the environment
  log(f"{topo.name}: {topo.chips} x {topo.chip.device_kind} ({topo.chip.hbm_gib} GiB HBM, "
      f"{topo.chip.bf16_tflops:g} bf16 TFLOP/s each); GRAIN {model.hr_size} <-> "
      f"{model.lr_size}, {o.compute_dtype}{', remat' if o.remat else ''}; libtpu {libtpu}")
  log(HEADER)
  spec = functools.partial(program_spec, topo.name, model, o.compute_dtype, o.remat, o.losses)

  def compile_one(group, stage, program, batch) -> dict:
    outcome = isolated.run(__name__, "compile_program",
                           dict(spec=spec(program, stage, batch)),
                           memory_limit_gb=o.memory_limit_gb, timeout_s=o.timeout_s,
                           env={"JAX_PLATFORMS": "cpu"})  # this host's, never a real TPU
    case = _case(o, topo, group, stage, program, batch, outcome)
    result["cases"].append(case)
    log(row(case))
    if o.out:
      with open(o.out, "w") as f:
        json.dump(result, f, indent=1)
    return case

  def compile_group(group, stage, programs, batch) -> str:
    """'fits' (every program), 'does not fit' (one was refused for HBM or planned over it)
    or the status of a compile that failed otherwise. After a program that does not fit the
    group's other programs are skipped."""
    for program in programs:
      status = compile_one(group, stage, program, batch)["status"]
      if status != "fits":
        return "does not fit" if status == "over HBM" else status
    return "fits"

  for group, stage, programs, batches in _groups(o):
    if not o.max_batch:
      for b in batches:
        compile_group(group, stage, programs, b)
      continue
    best = largest_batch(lambda b: compile_group(group, stage, programs, b), batches[0],
                         o.max_batch_limit)
    result["max_batch"][group] = best
    log(f"  {group}: largest per-chip batch that fits: "
        f"{'unknown (a compile failed)' if best is None else best}")
  if o.out:
    with open(o.out, "w") as f:
      json.dump(result, f, indent=1)
  return result
