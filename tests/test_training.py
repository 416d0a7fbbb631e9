"""Training: multi-device equivalence, exact resume, stage hand-off, config handling, a run
whose loss falls, and train.py from the command line. All on the tiny config (32 <-> 4)."""
import json
import os
import signal
import subprocess
import sys

import chex
import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import ROOT, hook_training_step, kill_at, signal_at, xla_flags
from tiny_config import tiny_training

TESTS = os.path.dirname(os.path.abspath(__file__))

def test_two_and_four_devices_match_one_device():
  """Stage 1 on 2 and 4 devices against 1 device (3 steps each), and a 4th step with a NaN
  that every device skips. (Stage 4 on 4 devices: test_multiprocess.py.)"""
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, os.path.join(TESTS, "multidevice_equivalence.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT ", 1)[1])
  assert set(out) == {"invrrdb/2", "invrrdb/4"}
  for case, r in out.items():
    # Same parameters (trained networks, discriminator, BatchNorm statistics) up to float
    # summation order; the discriminator updates ran (step 2 of 3 logs them).
    assert r["max_diff"] <= 2e-5 * max(r["scale"], 1.0), (case, r)
    assert abs(r["loss"][0] - r["loss"][1]) <= 1e-4 * abs(r["loss"][0]), (case, r)
    assert r["d_loss"][0] > 0 and abs(r["d_loss"][0] - r["d_loss"][1]) <= 1e-4, (case, r)
  # A NaN in one device's shard: on 1, 2 and 4 devices the step is skipped (nothing changes)
  # and counted, and the step counter still advances.
  for case, r in out.items():
    assert r["nan_step"] == [[True, 1.0, 4], [True, 1.0, 4]], (case, r)


def test_the_train_state_packs_what_the_optimizer_updates():
  """Trained parameters and optimizer moments are one vector per dtype (train/packed.py:
  per-tensor updates cost most of a program's compile time); the networks and checkpoints
  still see them per tensor. (test_optim.py checks that packed steps equal per-tensor ones;
  the parity tests run the packed step.)"""
  import jax
  from jax.sharding import Mesh
  from grain_jax.train import initial_weights, optim, packed
  from grain_jax.train.step import create_training

  cfg = tiny_training("fea2code")
  abstract = lambda t: jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), t)
  v, dv, lv = jax.eval_shape(lambda: initial_weights.initial_variables(cfg)[:3])
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  state = create_training(cfg, abstract(v), abstract(dv), lv, mesh).state
  for params, opt_state in ((state.params, state.opt_state),
                            (state.d_params, state.d_opt_state)):
    floats = [a for a in jax.tree_util.tree_leaves((params, opt_state)) if a.dtype == np.float32]
    # Ranger's fast and slow weights and its two moments.
    assert len(floats) == 4 and all(len(a.shape) == 1 for a in floats)
  per_tensor = jax.eval_shape(packed.unpack_all, state)
  assert set(per_tensor.params.fast) == {"fea2code"}
  shapes = lambda t: [a.shape for a in jax.tree_util.tree_leaves(t)]
  assert shapes(per_tensor.params.fast) == shapes(v["params"]["fea2code"])
  assert shapes(per_tensor.opt_state) == shapes(jax.eval_shape(
      optim.make_optimizer(cfg.optimizer, lambda n: 1e-3).init, per_tensor.params))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
  """A folder of small natural pictures (and one unreadable file)."""
  d = tmp_path_factory.mktemp("train_pictures")
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    img = Image.fromarray(getattr(skimage.data, name)())
    img.resize((img.width // 6, img.height // 6), Image.BICUBIC).save(d / f"{name}.png")
  (d / "broken.png").write_bytes(b"not an image")
  return str(d)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  from grain_jax.cli.program import enable_compilation_cache
  enable_compilation_cache()


def _cfg(pictures, stage="invrrdb", **over):
  over.setdefault("data.crop", "random")
  over.setdefault("data.random_scale", (0.5, 1.0))
  return tiny_training(stage, **{"data.train": pictures, **over})


def _weights(workdir):
  from grain_jax.formats import weights
  tree, _, meta = weights.load_weights(os.path.join(workdir, "weights"))
  return tree, meta


def _leaves(tree):
  import jax
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _log(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_interrupted_run_resumes_to_the_same_result(pictures, tmp_path, monkeypatch):
  from grain_jax.train import loop
  cfg = _cfg(pictures)
  loop.train_and_evaluate(cfg, str(tmp_path / "straight"), progress=False)

  # The same run killed during step 3 (after the checkpoint of step 2), then restarted.
  unhook = hook_training_step(monkeypatch, kill_at(3))
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False)
  unhook()
  assert [r["step"] for r in _log(tmp_path / "resumed")] == [1, 2]
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False)

  a, _ = _weights(tmp_path / "straight")
  b, meta = _weights(tmp_path / "resumed")
  chex.assert_trees_all_equal(a, b)  # the same tree, bit for bit
  assert meta["sources"]["trained_steps"] == 4
  straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]
  assert straight == resumed  # the same batches and losses at every step


def test_changed_config_is_refused_on_resume(pictures, tmp_path):
  from grain_jax.train import checkpoints, loop
  loop.train_and_evaluate(_cfg(pictures, max_steps=2), str(tmp_path), progress=False)
  with pytest.raises(checkpoints.ConfigMismatchError, match=r"loss.l2: checkpoint 1.0, now 2.0"):
    loop.train_and_evaluate(_cfg(pictures, max_steps=4, **{"loss.l2": 2.0}), str(tmp_path),
                            progress=False)
  # Run length and reporting may change: this continues the run.
  loop.train_and_evaluate(_cfg(pictures, max_steps=3, log_every=3), str(tmp_path),
                          progress=False)
  assert _weights(tmp_path)[1]["sources"]["trained_steps"] == 3
  # A config saved before loss.ssim existed matches loss.ssim 0 (what that version did),
  # not another value.
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["loss"]["ssim"]
  saved["model"].pop("conv_weight_grad", None)  # a choice of how to run: may change
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(checkpoints.ConfigMismatchError,
                     match=r"loss.ssim: checkpoint 0.0, now 0.5"):
    loop.train_and_evaluate(_cfg(pictures, max_steps=4, **{"loss.ssim": 0.5}),
                            str(tmp_path), progress=False)
  # 'xla' is what 'auto' means for these small convs: the same programs, no new compilation.
  loop.train_and_evaluate(_cfg(pictures, max_steps=4, **{"model.conv_weight_grad": "xla"}),
                          str(tmp_path), progress=False)
  assert _weights(tmp_path)[1]["sources"]["trained_steps"] == 4


def test_stage_two_starts_from_stage_one_and_trains_only_fea2code(pictures, tmp_path):
  from grain_jax.train import loop
  s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
  loop.train_and_evaluate(_cfg(pictures, max_steps=2), s1, progress=False)
  w1, _ = _weights(s1)
  loop.train_and_evaluate(
      _cfg(pictures, "fea2code", max_steps=2, **{"init.previous_workdir": s1,
                                                 "init.random_all": False}), s2, progress=False)
  w2, meta = _weights(s2)
  for net in ("rescaler", "generator", "fusion"):  # frozen: carried over unchanged
    chex.assert_trees_all_equal(w1[net], w2[net])
  changed = [not np.array_equal(x, y) for x, y in zip(_leaves(w1["fea2code"]),
                                                      _leaves(w2["fea2code"]))]
  assert any(changed)
  assert "previous stage" in meta["sources"]["rescaler"] and meta["sources"]["stage"] == "fea2code"
  assert "discriminator" in meta["networks"]


def test_missing_weights_are_named(pictures, tmp_path):
  from grain_jax.train import loop
  cfg = _cfg(pictures, "fea2code", **{"init.random_all": False,
                                      "init.random_init": ("fea2code", "discriminator")})
  with pytest.raises(ValueError, match=r"rescaler \(--invrrdb\), generator \(--stylegan2\)"):
    loop.train_and_evaluate(cfg, str(tmp_path), progress=False)


def test_short_run_loss_falls_and_validation_writes_metrics(pictures, tmp_path):
  from grain_jax.train import loop
  import torch
  from test_inception import pt_inception_state_dict

  held = tmp_path / "held"
  held.mkdir()
  Image.fromarray(skimage.data.astronaut()[100:164, 200:264]).save(held / "a.png")
  Image.fromarray(skimage.data.coffee()[100:164, 200:264]).save(held / "b.png")
  pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(pt_inception_state_dict(), pth)
  # Fixed center crops (no random crops or flips): the loss measures fitting, not luck.
  # Validation with FID/KID (64-d features: 2 images).
  cfg = _cfg(pictures, max_steps=40, log_every=1, checkpoint_every=40, eval_every=40,
             image_every=40, **{"loss.adv": 0.0, "data.eval": str(held), "data.crop": "center",
                                "optimizer.name": "adam", "learning_rate": 3e-3,
                                "data.eval_fid": True, "data.eval_inception": str(pth),
                                "data.eval_fid_dims": 64})
  m = loop.train_and_evaluate(cfg, str(tmp_path / "run"), progress=False)
  losses = [r["loss_l2"] for r in _log(tmp_path / "run")]
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses
  assert m["num_images"] == 2 and "hr_inv_psnr" in m and "bicubic_psnr" in m
  assert m["hr_inv_fid"] > 0 and m["bicubic_kid"] is not None and m["fid_dims"] == 64
  assert "IR-SE50" in m["skipped_metrics"]["hr_inv_id"]
  assert os.path.exists(tmp_path / "run" / "metrics.json")
  assert os.path.exists(tmp_path / "run" / "best" / "grain_weights.json")
  grid = np.asarray(Image.open(tmp_path / "run" / "images" / "0000040.png"))
  assert grid.shape == (64, 128, 3)  # the 8 panels, 2 rows of 4
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "run" / "tensorboard"))


def test_train_py_with_overrides(pictures, tmp_path):
  run = lambda *a: subprocess.run(
      [sys.executable, "train.py", "--config", os.path.join(TESTS, "tiny_config.py"),
       "--workdir", str(tmp_path / "w"), "--noprogress", *a], cwd=ROOT, capture_output=True,
      text=True)
  res = run("--config.max_steps=2", "--config.batch_size=1", "--config.loss.adv=0")
  assert res.returncode == 2, res.stderr
  assert res.stderr.strip().splitlines() == [
      "python train.py: error: no training data: set --config.data.train=FOLDER or "
      "tfds:NAME/SPLIT"]
  res = run("--config.max_steps=2", "--config.batch_size=1", "--config.loss.adv=0",
            f"--config.data.train={pictures}")
  assert res.returncode == 0, res.stderr[-3000:]
  with open(tmp_path / "w" / "config.json") as f:
    saved = json.load(f)
  assert saved["batch_size"] == 1 and saved["max_steps"] == 2 and saved["loss"]["adv"] == 0
  import grain_jax
  m = grain_jax.load(str(tmp_path / "w"))  # a training workdir loads like converted weights
  assert m.downscale(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 4, 4, 3)


def test_a_time_budget_sets_the_steps_and_a_fixed_run_of_that_length_is_identical(
    pictures, tmp_path, monkeypatch):
  """time_budget_s: the step time measured after the compiling step decides the run's length
  and the cosine schedule's; rerun with that many fixed steps, the weights are bit-identical
  (the probe ends inside the warmup). The clock is driven: compiling step done at 100 s, the
  5 probe steps at 105 s (1 s/step), budget 120 s -> 6 + int((120 - 105 - 3.4) / 1) = 17."""
  import grain_jax
  from grain_jax.train import loop
  from grain_jax.util import runs

  base = {"data.train": pictures, "lr_schedule": "cosine", "warmup_steps": 10,
          "checkpoint_every": 0, "log_every": 1}
  clock = iter([100.0, 105.0])
  monkeypatch.setattr(runs, "clock", lambda: next(clock))
  budget = _cfg(pictures, **base, max_steps=1000, time_budget_s=120.0)
  loop.train_and_evaluate(budget, str(tmp_path / "budget"), progress=False, started=0.0)
  assert [r["step"] for r in _log(tmp_path / "budget")] == list(range(1, 18))
  monkeypatch.undo()
  loop.train_and_evaluate(_cfg(pictures, **base, max_steps=17), str(tmp_path / "fixed"),
                          progress=False)
  a, b = (grain_jax.load(str(tmp_path / w)) for w in ("budget", "fixed"))
  assert a.meta["sources"]["trained_steps"] == b.meta["sources"]["trained_steps"] == 17
  chex.assert_trees_all_equal(a.variables, b.variables)
  assert _log(tmp_path / "budget") == _log(tmp_path / "fixed")



def test_a_budgeted_run_stopped_before_its_budget_decided_decides_when_resumed(
    pictures, tmp_path, monkeypatch):
  """Killed during the probe (checkpoint at step 2, the length decided only at step 6), the
  resumed run probes again instead of running to max_steps: compiling step 3 done at 100 s,
  probe steps 4-8 at 105 s, budget 120 s from its start -> 8 + int((120 - 105 - 3.4) / 1) = 19."""
  from grain_jax.train import loop
  from grain_jax.util import runs

  cfg = _cfg(pictures, max_steps=40, time_budget_s=120.0, checkpoint_every=2,
             **{"lr_schedule": "cosine", "warmup_steps": 10})
  clock = iter([100.0, 100.0, 105.0])
  monkeypatch.setattr(runs, "clock", lambda: next(clock))
  unhook = hook_training_step(monkeypatch, kill_at(3))
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(cfg, str(tmp_path), progress=False, started=0.0)
  unhook()
  loop.train_and_evaluate(cfg, str(tmp_path), progress=False, started=0.0)
  assert [r["step"] for r in _log(tmp_path)] == list(range(1, 20))
  assert _weights(tmp_path)[1]["sources"]["trained_steps"] == 19

def test_demo_pipeline_with_fixed_steps_preempted_in_stage_3_and_resumed(tmp_path, capsys,
                                                                          monkeypatch):
  """The quick start's job at a tiny size, a pipeline of four stages in WORKDIR/stageK_NAME,
  each from the previous one's result, with only training fields in their config.json;
  stopped by SIGTERM in stage 3 (after its step 2, with a checkpoint), the same run skips
  stages 1-2 and resumes stage 3 from its checkpoint, then evaluates: metrics.json with the
  steps each stage ran and the command that reruns them, and the labelled comparison."""
  from grain_jax.train import quickstart, stages, stopping
  from grain_jax.configs import demo
  from tiny_config import tiny_model

  cfg = demo.get_config()
  cfg.model = tiny_model()
  cfg.pipeline.budget_s = 0.0
  cfg.pipeline.steps = dict(invrrdb=3, fea2code=2, fusion=3, finetune=2)
  cfg.checkpoint_every, cfg.log_every = 2, 1
  cfg.batch_size = 2
  cfg.demo.train_images = ("astronaut", "coffee")
  cfg.demo.heldout_images = ("chelsea", "coins")
  work = tmp_path / "demo"
  unhook = hook_training_step(monkeypatch, signal_at(2, signal.SIGTERM, "fusion"))
  with pytest.raises(stopping.Interrupted, match="stopped at step 2 \\(SIGTERM\\)"):
    quickstart.run(cfg, str(work), progress=False)
  unhook()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  record = json.loads((work / "pipeline.json").read_text())
  assert [(r["stage"], r["steps"]) for r in record["stages"]] == [("invrrdb", 3), ("fea2code", 2)]
  capsys.readouterr()
  m = quickstart.run(cfg, str(work), progress=False)
  out = capsys.readouterr().out
  assert "stage 1/4 invrrdb: finished earlier (3 steps)" in out
  assert "stage 3/4 fusion: 3 steps in" in out and "GRAIN    hr PSNR" in out
  assert [r["steps"] for r in m["stages"]] == [3, 2, 3, 2]
  assert [r["step"] for r in _log(work / "stage3_fusion")] == [1, 2, 3]  # resumed after 2
  previous = ""
  for name, stage in (("stage1_invrrdb", "invrrdb"), ("stage2_fea2code", "fea2code"),
                      ("stage3_fusion", "fusion"), ("stage4_finetune", "finetune")):
    c = json.loads((work / name / "config.json").read_text())
    assert "pipeline" not in c and "demo" not in c and c["stage"] == stage
    assert c["init"]["previous_workdir"] == previous
    assert c["learning_rate"] == cfg.pipeline.overrides[stage].learning_rate
    assert c["d_every"] == stages.get(stage).d_every
    assert c["loss"]["lr_l2"] == stages.get(stage).lr_l2
    previous = str(work / name)
  assert m["rerun"].endswith(
      "--config.pipeline.budget_s=0 --config.pipeline.steps.invrrdb=3 "
      "--config.pipeline.steps.fea2code=2 --config.pipeline.steps.fusion=3 "
      "--config.pipeline.steps.finetune=2")
  saved = json.loads((work / "metrics.json").read_text())
  assert saved["stages"] == m["stages"] and saved["hr_psnr"] == m["hr_psnr"]
  grid = np.asarray(Image.open(work / "comparison.png"))
  # Two held-out pictures -> two rows of six 32 px panels enlarged 3x, with label strips.
  assert grid.shape[1] == 6 * 96 and grid.shape[0] > 2 * 96


def test_pipeline_command_line_sets_shared_and_per_stage_fields(capsys):
  """--config.FIELD sets every stage, --config.pipeline.overrides.STAGE.FIELD any training
  field of one stage (typed), fields at -1 keep each stage's recipe; mistakes are named."""
  from grain_jax import cli
  from grain_jax.cli import config_flags
  from grain_jax.train.config import stage_config

  tiny = os.path.join(os.path.dirname(__file__), "tiny_config.py:pipeline")
  cfg = config_flags.load(tiny, [
      "--config.batch_size=4", "--config.pipeline.overrides.fusion.learning_rate=5e-4",
      "--config.pipeline.overrides.finetune.data.random_scale=(0.2,0.4)",
      "--config.pipeline.overrides.finetune.loss.l2=2"])
  fusion, finetune = (stage_config(cfg, s) for s in ("fusion", "finetune"))
  assert fusion.batch_size == finetune.batch_size == 4
  assert fusion.learning_rate == 5e-4 and finetune.learning_rate == 1e-3  # tiny's shared 1e-3
  assert tuple(finetune.data.random_scale) == (0.2, 0.4) and finetune.loss.l2 == 2.0
  assert finetune.loss.lr_l2 == 0.1 and fusion.loss.lr_l2 == 0.0  # each stage's own
  for args, said in (
      (["--config.pipeline.overrides.fusion.los.l2=1"], "no field los.l2"),
      (["--config.pipeline.overrides.fusion.loss.l2=x"], "'x' is not a float"),
      (["--config.pipeline.overrides.stage9.max_steps=1"], "stage9 is not a stage")):
    assert cli.main(["pipeline", "--config", tiny, "--show_config", *args]) == 2
    assert said in capsys.readouterr().err
  assert cli.main(["pipeline", "--config", "invrrdb", "--workdir", "w"]) == 2
  assert "one stage's config, not a pipeline's" in capsys.readouterr().err


def test_a_new_row_in_the_loss_table_reaches_every_consumer(pictures, tmp_path, monkeypatch,
                                                            capsys):
  """A loss is one row of losses.LOSSES: its weight reaches the training configs (and a
  checkpoint without it resumes as 'off'), the step computes and logs it, the bench and the
  demo take it."""
  import jax.numpy as jnp
  from grain_jax import cli
  from grain_jax.train import checkpoints, losses, loop
  from grain_jax.configs import demo

  tv = lambda i: (jnp.mean(jnp.abs(jnp.diff(i.hr, axis=1)))
                  + jnp.mean(jnp.abs(jnp.diff(i.hr, axis=2))))
  monkeypatch.setitem(losses.LOSSES, "tv", losses.Loss("tv", tv, 0.5, doc="total variation"))

  assert _cfg(pictures).loss.tv == 0.5
  assert checkpoints.added_fields()["loss.tv"] == 0.0
  assert demo.get_config().loss.tv == 0.0  # the demo trains on the L2 terms only

  cfg = _cfg(pictures, max_steps=1, checkpoint_every=0, **{"loss.tv": 0.5})
  loop.train_and_evaluate(cfg, str(tmp_path), progress=False)
  first = _log(tmp_path)[0]
  assert first["loss_tv"] > 0
  assert first["loss"] == pytest.approx(
      sum(w * first[f"loss_{k}"] for k, w in cfg.loss.items() if w > 0), rel=1e-5)

  assert cli.main(["bench", "--config", os.path.join(os.path.dirname(__file__), "tiny_config.py"),
                   "--batch_sizes", "", "--stages", "", "--losses", "l2,tv", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["cases"] == []
