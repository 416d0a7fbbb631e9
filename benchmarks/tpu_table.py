"""The markdown table of docs/performance.md's TPU section, from `grain-jax bench --topology
... --out FILE` results (benchmarks/results/tpu_*.json).

    python benchmarks/tpu_table.py benchmarks/results/tpu_*.json
"""
import argparse
import json


def rows(result: dict) -> list[str]:
  out = []
  for c in result["cases"]:
    topo = f"{result['topology']} ({result['device_kind']})"
    host = (f"{c['compile_s']:.0f} s" if "compile_s" in c else
            f"stopped after {c['host_seconds']:.0f} s")
    mem = f"{c['host_peak_gb']:.1f} GB" if c.get("host_peak_gb") else "-"
    if c["status"] == "fits":
      h = c["hbm_gib"]
      plan = (f"{h['total']:.2f} of {c['chip_hbm_gib']:.2f} (args {h['arguments']:.2f}, "
              f"temp {h['temporaries']:.2f})")
      flops = f"{c['tflop_per_chip']:.3g}"
      peak = f"{1e3 * c['seconds_at_peak']:.3g}"
    elif c["status"] == "does not fit":
      plan = (f"does not fit: needs {c['needed_gib']:.2f} of {c['chip_hbm_gib']:.2f}"
              if c.get("needed_gib") else "does not fit")
      flops = peak = "-"
    else:
      plan, flops, peak = c["error"], "-", "-"
    out.append(f"| {topo} | {c['name']} | {c['batch_per_chip']} | {plan} | {flops} | {peak} "
               f"| {host} | {mem} |")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", nargs="+", help="JSON files of grain-jax bench --topology --out")
  args = p.parse_args()
  print("| slice | program | batch/chip | HBM plan per chip, GiB | TFLOP/chip | ms at bf16 peak "
        "| compile | compiler host memory |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for path in args.results:
    with open(path) as f:
      result = json.load(f)
    print("\n".join(rows(result)))
  for path in args.results:
    with open(path) as f:
      result = json.load(f)
    if result.get("max_batch"):
      best = ", ".join(f"{k} {v}" for k, v in result["max_batch"].items())
      print(f"\nLargest per-chip batch that fits, {result['topology']}: {best}")


if __name__ == "__main__":
  main()
