"""grain-jax bench --topology: the TPU compiler (libtpu, the tpu extra) compiles a tiny
config's programs for a v5e slice on this CPU host; the plans and FLOPs are per chip."""
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from grain_jax import cli
from grain_jax.nets.model import GRAIN, placeholder_variables
from grain_jax.train import aot
from grain_jax.util import isolated, tpu
from tiny_config import tiny_model

TINY = os.path.join(os.path.dirname(__file__), "tiny_config.py")
GIB = 2 ** 30


def _nbytes(tree) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree_util.tree_leaves(tree))


def test_a_v5e_slice_compiles_upscale_and_a_training_step(capsys, tmp_path):
  """Downscale and upscale at 2 images per chip (and at 2^19, which the compiler refuses for
  want of HBM), and stage 2's d, r1 and g programs, for 4 v5e chips."""
  out = tmp_path / "tpu.json"
  rc = cli.main(["bench", "--config", TINY, "--topology", "v5e:2x2", "--batch_sizes",
                 f"2,{2 ** 19}", "--stages", "fea2code", "--losses", "l2,lr_l2,adv", "--json",
                 "--out", str(out)])
  result = json.loads(capsys.readouterr().out)
  assert rc == 0 and json.loads(out.read_text()) == result
  assert (result["chips"], result["device_kind"], result["chip_hbm_gib"]) == (
      4, "TPU v5 lite", 15.75)
  assert result["compute_dtype"] == "bfloat16" and result["conv_weight_grad"] == "xla"
  cases = {(c["name"], c["batch_per_chip"]): c for c in result["cases"]}
  assert list(cases) == [("downscale", 2), ("downscale", 2 ** 19), ("upscale", 2),
                         ("upscale", 2 ** 19), ("train_fea2code_g", 1),
                         ("train_fea2code_d", 1), ("train_fea2code_r1", 1)]
  for (name, b), c in cases.items():
    assert c["global_batch"] == 4 * b and c["host_peak_gb"] > 0.1 and c["compile_s"] > 0
    if b == 2 ** 19:  # refused in the compiler's HBM check, with what it needed
      assert c["status"] == "does not fit" and c["needed_gib"] > 15.75, c
      continue
    assert c["status"] == "fits", c
    h = c["hbm_gib"]
    assert math.isclose(h["total"], h["arguments"] + h["outputs"] - h["aliased"]
                        + h["temporaries"] + h["generated_code"])
    assert 0 < h["total"] < 15.75 and c["tflop_per_chip"] > 0
    assert math.isclose(c["seconds_at_peak"], c["tflop_per_chip"] / 197.0)

  # Per chip: upscale holds all of GRAIN's variables (replicated; the TPU pads small arrays
  # to its tiles) and does the FLOPs of this chip's 2 images, not of the global batch's 8
  # (XLA counts a TPU program's FLOPs after its optimisations: ~1.4 x the CPU's HLO count).
  model = GRAIN.from_config(tiny_model())
  variables = placeholder_variables(model)
  up = cases[("upscale", 2)]
  assert up["hbm_gib"]["arguments"] * GIB >= _nbytes(variables)
  cpu_flops = jax.jit(lambda v, x: model.apply(v, x, method=model.upscale)).lower(
      variables, jnp.zeros((2, 4, 4, 3))).cost_analysis()["flops"]
  assert 1.0 < up["tflop_per_chip"] * 1e12 / cpu_flops < 2.0
  # The generator step donates the state: its outputs alias its arguments.
  g = cases[("train_fea2code_g", 1)]
  assert g["hbm_gib"]["aliased"] > 0.5 * g["hbm_gib"]["outputs"]


def test_the_largest_batch_is_searched_by_doubling_until_the_compiler_refuses(monkeypatch):
  """--max_batch with a stand-in compiler that fits up to 8 images per chip (g) and 16
  (d): the stage stops at 8, its d program is not compiled where g did not fit."""
  compiled = []

  def fake_run(module, function, kwargs, **limits):
    spec = kwargs["spec"]
    compiled.append((spec["program"], spec["batch_per_chip"]))
    limit = 8 if spec["program"] == "g" else 16
    if spec["batch_per_chip"] > limit:
      return isolated.Outcome("ok", dict(fits=False, lower_s=1.0, compile_s=1.0,
                                         reason="RESOURCE_EXHAUSTED", needed_gib=20.0,
                                         available_gib=15.75), 2.0, 1.0)
    hbm = dict(arguments=1.0, outputs=1.0, temporaries=1.0, aliased=1.0, generated_code=0.0,
               total=2.0)
    return isolated.Outcome("ok", dict(fits=True, lower_s=1.0, compile_s=1.0, hbm_gib=hbm,
                                       flops_per_chip=1e12), 2.0, 1.0)

  monkeypatch.setattr(aot.isolated, "run", fake_run)
  result = aot.run(aot.Options(topology="v5e:2x2", model=tiny_model(), batch_sizes=(),
                               stages=("invrrdb",), train_batch=2, max_batch=True),
                   log=lambda _: None)
  assert result["max_batch"] == {"train_invrrdb": 8}
  assert compiled == [("g", 2), ("d", 2), ("g", 4), ("d", 4), ("g", 8), ("d", 8), ("g", 16)]


def test_a_plan_the_compiler_accepts_above_the_chips_hbm_does_not_count_as_fitting(monkeypatch):
  """Seen on v5e: an r1 program compiled with arguments + temporaries of 16.5 GiB of 15.75."""
  def fake_run(module, function, kwargs, **limits):
    b = kwargs["spec"]["batch_per_chip"]
    total = 4.0 * b + 0.5
    hbm = dict(arguments=0.5, outputs=0.0, temporaries=4.0 * b, aliased=0.0,
               generated_code=0.0, total=total)
    return isolated.Outcome("ok", dict(fits=True, lower_s=1.0, compile_s=1.0, hbm_gib=hbm,
                                       flops_per_chip=1e12), 2.0, 1.0)

  monkeypatch.setattr(aot.isolated, "run", fake_run)
  result = aot.run(aot.Options(topology="v5e:2x2", model=tiny_model(), batch_sizes=(1,),
                               stages=(), max_batch=True), log=lambda _: None)
  assert result["max_batch"] == {"downscale": 2, "upscale": 2}
  over = [c for c in result["cases"] if c["batch_per_chip"] == 4]
  assert [c["status"] for c in over] == ["over HBM", "over HBM"]
  assert "over HBM" in aot.row(over[0])


def test_a_compile_stopped_at_the_host_memory_limit_is_reported_and_ends_the_search(
    monkeypatch, tmp_path):
  """Without a time limit (the default), as a real 1024 run on a small host meets it."""
  monkeypatch.setattr(aot.isolated, "run", lambda *a, **k: isolated.Outcome(
      "memory", None, 300.0, 11.6, "MemoryError"))
  out = tmp_path / "r.json"
  result = aot.run(aot.Options(topology="v5e:2x2", model=tiny_model(), batch_sizes=(),
                               stages=("fusion",), train_batch=4, max_batch=True,
                               memory_limit_gb=11.5, out=str(out)), log=lambda _: None)
  (case,) = result["cases"]
  assert case["status"] == "host memory" and "limit (11.5 GB)" in case["error"]
  assert case["host_peak_gb"] == 11.6 and result["max_batch"] == {"train_fusion": None}
  assert json.loads(out.read_text())["cases"] == result["cases"]


def test_the_search_halves_from_a_start_that_does_not_fit():
  fits_up_to = lambda n: lambda b: "fits" if b <= n else "does not fit"
  assert aot.largest_batch(fits_up_to(5), 16, 256) == 4
  assert aot.largest_batch(fits_up_to(0), 4, 256) == 0
  assert aot.largest_batch(fits_up_to(1000), 3, 100) == 96
  assert aot.largest_batch(lambda b: "fits" if b < 8 else "host memory", 2, 256) is None


def test_out_of_hbm_messages_and_bad_topologies():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (34.38G) exceeds available HBM (15.75G).")
  assert aot._out_of_hbm(msg) == dict(needed_gib=34.38, available_gib=15.75)
  assert aot._out_of_hbm("INTERNAL: something else") is None
  assert tpu.parse("v4:2x2x1").chips == 4 and tpu.parse("v5e:4x4").chips == 16
  for bad in ("v5e", "v9:2x2", "v5e:2"):
    with pytest.raises(ValueError, match="expected GENERATION:AxB"):
      tpu.parse(bad)
