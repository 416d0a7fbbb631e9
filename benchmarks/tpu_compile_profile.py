"""Where a TPU compile's time goes: the kernels it generates, by part of the program.

    python benchmarks/tpu_compile_profile.py --program invrrdb:g --batch 2 \
        [--topology v5e:2x2] [--config 1024] [--config.model.hr_size=256] \
        [--config.model.scan_blocks=True ...] [--json out.json]

Compiles one program as `grain-jax bench --topology` does (train/aot.py, bfloat16, GRAIN's
losses; PROGRAM is upscale, downscale or STAGE:d|r1|g) with XLA's dump on, and reads the
compiled module: the number of kernels (the TPU compiler spends most of its time generating
code, kernel by kernel), the compiler's estimated cycles, and the kernels per part of the
program (from their op_name: the optimizer update and divergence guard, the rescaler's
forward and backward passes, the loss networks...), and the largest items live at the peak
of the program's HBM plan (also for a program that does not fit). Needs libtpu (pip install
'grain-jax[tpu]'), no TPU. Numbers in docs/performance.md.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time


def _part(op_name: str) -> str:
  """A kernel's part of the program, from its op_name."""
  name = re.sub(r"^jit\([^)]*\)/(shard_map/)?", "", op_name)
  backward = name.startswith("transpose(")
  for key, part in (("rescaler", "rescaler"), ("fea2code", "fea2code"),
                    ("generator", "generator"), ("fusion", "fusion"), ("IRSE", "irse50"),
                    ("LPIPS", "lpips"), ("Discriminator", "discriminator")):
    if key in name:
      return f"{part} {'backward' if backward else 'forward'}"
  if "convert_element_type" in name:
    return "parameter casts"
  return "optimizer, guard, other"


def profile(dump: str) -> dict:
  """Kernels, estimated cycles and kernels per part of the largest compiled module in `dump`."""
  files = sorted(glob.glob(os.path.join(dump, "*after_codegen.txt")), key=os.path.getsize)
  if not files:
    raise SystemExit(f"no compiled module was dumped in {dump}")
  kernels, cycles, parts = 0, 0, collections.Counter()
  with open(files[-1]) as f:
    for line in f:
      m = re.search(r'"estimated_cycles":"?(\d+)', line)
      if not m:
        continue
      kernels += 1
      cycles += int(m.group(1))
      op = re.search(r'op_name="([^"]*)"', line)
      parts[_part(op.group(1) if op else "")] += 1
  return dict(kernels=kernels, estimated_mcycles=cycles / 1e6, kernels_by_part=dict(
      parts.most_common()))


def peak(dump: str, top: int = 15) -> dict:
  """What is live at the peak of the step program's HBM plan (from its live-range dump, which a
  program refused for its plan also has): the peak's bytes and its `top` largest items, the
  buffers grouped by op_name (the program's part and operation) as XLA's own breakdown does."""
  files = sorted(glob.glob(os.path.join(dump, "*after_optimizations-live-range.txt")),
                 key=os.path.getsize)
  if not files:
    return {}
  with open(files[-1]) as f:
    lines = f.read().splitlines()
  start = next((i for i, l in enumerate(lines) if "Stack trace breakdown for peak usage" in l), None)
  if start is None:
    return {}
  total = int(re.sub(r"\D", "", lines[start].split(":", 1)[1]))
  items = collections.Counter()
  for line in lines[start + 1:]:
    m = re.search(r"^(\s*[│ ]*)[├└]── (.*) \([\d.]+%, total: ([\d ]+) bytes", line)
    # Depth 1 only, so nothing counts twice (the train state is one item; its tensors are
    # its children).
    if m and len(m.group(1)) // 4 == 1:
      name = re.sub(r"^jit\([^)]*\)/(shard_map/)?", "", re.sub(r"\{\d+\}$", "", m.group(2)))
      items[name] += int(m.group(3).replace(" ", ""))
  return dict(peak_gib=round(total / 2 ** 30, 2), peak_items_mib={
      k: round(v / 2 ** 20, 1) for k, v in items.most_common(top)})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--program", required=True, help="upscale, downscale or STAGE:d|r1|g")
  p.add_argument("--batch", type=int, default=1, help="per-chip batch")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--config", default="1024",
                 help="a model config, its fields as --config.model.FIELD=VALUE (as grain-jax "
                      "bench; --config.model.hr_size=256: the 1024 layout, faster)")
  p.add_argument("--json", default="", help="add the result to this file's 'runs'")
  args, overrides = p.parse_known_args(argv)
  dump = tempfile.mkdtemp(prefix="tpu_profile_")
  # Before JAX starts: the dump flag, and this host's CPU as JAX's platform.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  from grain_jax.util import tpu
  tpu.quiet_libtpu()
  from grain_jax.cli import config_flags
  from grain_jax.train import aot

  model = config_flags.load(args.config, overrides).model
  stage, program = args.program.split(":") if ":" in args.program else (None, args.program)
  spec = aot.program_spec(args.topology, model, "bfloat16", bool(model.get("remat", False)),
                          None, program, stage, args.batch)
  t = time.perf_counter()
  try:
    r = aot.compile_program(spec)
    # A plan over the chip's HBM is refused before code generation: nothing to count.
    found = {**(profile(dump) if r["fits"] else {}), **peak(dump)}
  finally:
    shutil.rmtree(dump, ignore_errors=True)  # hundreds of MB per program
  out = dict(program=args.program, batch_per_chip=args.batch, topology=args.topology,
             hr_size=int(model.hr_size), settings=overrides, fits=r["fits"],
             compile_s=round(r["compile_s"], 1), seconds=round(time.perf_counter() - t, 1),
             hbm_total_gib=r.get("hbm_gib", {}).get("total"), needed_gib=r.get("needed_gib"),
             **found)
  print(json.dumps(out, indent=1))
  if args.json:
    result = json.load(open(args.json)) if os.path.exists(args.json) else {"runs": []}
    result["runs"].append(out)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
