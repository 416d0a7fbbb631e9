"""grain-jax bench keeps working: a tiny config, every kind of case, the JSON it promises."""
import json
import math
import os

from grain_jax import cli
from grain_jax.train import bench

TINY = os.path.join(os.path.dirname(__file__), "tiny_config.py")


def test_bench_json_has_every_case_and_number(capsys, small_weights, tmp_path):
  from grain_jax.data import sources
  from grain_jax.formats import images
  import numpy as np

  # A few 64 px pictures for the precision measurement (the small weights are 64 <-> 4).
  rng = np.random.default_rng(0)
  for i in range(2):
    images.write_png(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), np.uint8))
  assert len(sources.FolderSource(str(tmp_path))) == 2
  rc = cli.main(["bench", "--config", TINY, "--batch_sizes", "1,2", "--stages", "invrrdb",
                   "--train_batch", "2", "--repeats", "1", "--json", "--losses", "l2,lr_l2",
                   "--conv_weight_grad", "matmul",
                   "--checkpoint", small_weights, "--data", str(tmp_path)])
  out = json.loads(capsys.readouterr().out)
  assert rc == 0
  assert out["ceiling_tflops"] > 0 and out["device"].startswith("cpu")
  assert out["conv_weight_grad"] == "matmul"
  names = [(c["name"], c["batch"]) for c in out["cases"]]
  assert names == [("downscale", 1), ("upscale", 1), ("downscale", 2), ("upscale", 2),
                   ("train_invrrdb", 2)]
  for c in out["cases"]:
    rate = c.get("images_per_s") or 1 / c["step_s"]
    assert rate > 0 and c["tflop_per_image"] > 0
    assert math.isclose(c["fraction_of_ceiling"], c["achieved_tflops"] / out["ceiling_tflops"])
    assert c["xla_memory_gb"] > 0
  # A batch of 2 costs twice the FLOPs of a batch of 1 per call: the same per image.
  up = {c["batch"]: c["tflop_per_image"] for c in out["cases"] if c["name"] == "upscale"}
  assert math.isclose(up[1], up[2], rel_tol=0.05)
  p = out["precision"]
  assert p["float32"]["num_images"] == p["bfloat16"]["num_images"] == 2
  assert abs(p["hr_psnr_change_db"]) < 1.0


def test_bench_refuses_bad_arguments(capsys):
  for args, said in ((["--stages", "stage9"], "--stages: unknown ['stage9']"),
                     (["--batch_sizes", "x"], "--batch_sizes: expected comma-separated"),
                     (["--checkpoint", "w"], "--checkpoint and --data go together"),
                     (["--losses", "l3"], "--losses: unknown ['l3']"),
                     (["--config", "no/such/config.py", "--stages", ""],
                      "neither a config file nor a built-in config"),
                     (["--config.model.no_such_field=1", "--stages", ""],
                      "has no field")):
    assert cli.main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grain-jax bench: error: ") and said in err[0]


def test_compile_only_reports_flops_and_memory_without_running(capsys):
  """--compile_only (for programs too big to run here): FLOPs and XLA's memory plan, no rate;
  with --remat the program holds the recomputation (more FLOPs per step)."""
  flops = {}
  for remat in ([], ["--remat"]):
    rc = cli.main(["bench", "--config", TINY, "--batch_sizes", "", "--stages", "invrrdb",
                     "--losses", "l2", "--compile_only", "--json", *remat])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["compile_only"] and out["remat"] == bool(remat)
    (case,) = out["cases"]
    assert case["compiled_only"] and "step_s" not in case and "images_per_s" not in case
    assert case["xla_memory_gb"] > 0 and case["compile_s"] > 0
    flops[bool(remat)] = case["tflop_per_image"]
  assert flops[True] > 1.05 * flops[False], flops
  assert "compiled only" in bench.row(case)


def test_model_fields_are_config_overrides(capsys):
  """bench takes --config.model.FIELD=VALUE like train, and records the run options."""
  rc = cli.main(["bench", "--config", "small", "--config.model.scan_blocks=True",
                 "--config.model.rescaler.encoder_blocks=3", "--batch_sizes", "1",
                 "--stages", "", "--compile_only", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert rc == 0 and out["scan_blocks"] is True
  assert [c["name"] for c in out["cases"]] == ["downscale", "upscale"]
