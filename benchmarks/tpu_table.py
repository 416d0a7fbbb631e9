"""The markdown table of docs/performance.md's TPU section, from `grain-jax bench --topology
... --out FILE` results (benchmarks/results/tpu_*.json): per slice and program, the largest
per-chip batch measured to fit, its plan and compile, and what the next batch needed.

    python benchmarks/tpu_table.py benchmarks/results/tpu_*.json          # that summary
    python benchmarks/tpu_table.py --all benchmarks/results/tpu_*.json    # every compile
"""
import argparse
import json


def _cells(c: dict) -> tuple[str, str, str, str, str]:
  """(plan, TFLOP/chip, ms at peak, compile, host memory) of one case."""
  host = (f"{c['compile_s']:.0f} s" if "compile_s" in c else
          f"stopped after {c['host_seconds']:.0f} s")
  mem = f"{c['host_peak_gb']:.1f} GB" if c.get("host_peak_gb") else "-"
  if c["status"] in ("fits", "over HBM"):  # compiled: a plan and FLOPs
    h = c["hbm_gib"]
    plan = f"{h['total']:.2f} of {c['chip_hbm_gib']:.2f} (temp {h['temporaries']:.2f})"
    if c["status"] == "over HBM":
      plan = f"over HBM: compiled, but plans {plan}"
    return plan, f"{c['tflop_per_chip']:.3g}", f"{1e3 * c['seconds_at_peak']:.3g}", host, mem
  if c["status"] == "does not fit":
    plan = (f"does not fit: needs {c['needed_gib']:.2f} of {c['chip_hbm_gib']:.2f}"
            if c.get("needed_gib") else "does not fit")
    return plan, "-", "-", host, mem
  return c["error"], "-", "-", host, mem


def all_rows(result: dict) -> list[str]:
  """One row per compile."""
  topo = f"{result['topology']} ({result['device_kind']})"
  return [f"| {topo} | {c['name']} | {c['batch_per_chip']} | " + " | ".join(_cells(c)) + " |"
          for c in result["cases"]]


def summary_rows(result: dict) -> list[str]:
  """One row per program: the largest batch that fits (else the last compile), and what the
  smallest larger batch that was refused needed."""
  topo = f"{result['topology']} ({result['device_kind']})"
  names = list(dict.fromkeys(c["name"] for c in result["cases"]))
  out = []
  for name in names:
    cases = [c for c in result["cases"] if c["name"] == name]
    fits = [c for c in cases if c["status"] == "fits"]
    best = max(fits, key=lambda c: c["batch_per_chip"]) if fits else cases[-1]
    larger = sorted((c for c in cases if c["status"] in ("does not fit", "over HBM")
                     and c["batch_per_chip"] > (best["batch_per_chip"] if fits else 0)),
                    key=lambda c: c["batch_per_chip"])
    nxt = "-"
    if larger:
      c = larger[0]
      need = c.get("needed_gib") or (c.get("hbm_gib") or {}).get("total")
      nxt = (f"{c['batch_per_chip']}: needs {need:.2f}" if need
             else f"{c['batch_per_chip']}: does not fit")
    batch = best["batch_per_chip"] if fits else f"({best['batch_per_chip']})"
    plan, flops, peak, compile_s, mem = _cells(best)
    slowest = max(cases, key=lambda c: c.get("compile_s", c["host_seconds"]))
    if slowest.get("compile_s", 0) > 1.2 * best.get("compile_s", float("inf")):
      # the compile time varies with the batch; the slowest is what a user may wait for
      compile_s += f" (slowest {slowest['compile_s']:.0f} s at {slowest['batch_per_chip']})"
    out.append(f"| {topo} | {name} | {batch} | {plan} | {flops} | {peak} | {compile_s} | {mem} "
               f"| {nxt} |")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", nargs="+", help="JSON files of grain-jax bench --topology --out")
  p.add_argument("--all", action="store_true", help="one row per compile, not per program")
  args = p.parse_args()
  results = []
  for path in args.results:
    with open(path) as f:
      results.append(json.load(f))
  if args.all:
    print("| slice | program | batch/chip | HBM plan per chip, GiB | TFLOP/chip "
          "| ms at bf16 peak | compile | compiler host memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
      print("\n".join(all_rows(r)))
  else:
    print("| slice | program | largest batch/chip that fits | HBM plan per chip there, GiB "
          "| TFLOP/chip | ms at bf16 peak | compile | compiler host memory "
          "| next batch, GiB per chip |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
      print("\n".join(summary_rows(r)))
  for r in results:
    if r.get("max_batch"):
      best = ", ".join(f"{k} {'unknown (a compile failed)' if v is None else v}"
                       for k, v in r["max_batch"].items())
      print(f"\nLargest per-chip batch at which every program fits, {r['topology']}: {best}")


if __name__ == "__main__":
  main()
