"""Several processes in one job, on this machine: 2 processes x 2 CPU devices (gloo
collectives, a coordinator on localhost) against 1 process (4 devices, or 1), through the
`grain-jax` command as a cluster user runs it. Stage 1 (patch discriminator, synchronised
BatchNorm) with validation, and stopped by a signal to one process and resumed; stage 4
(StyleGAN2 discriminator, R1); evaluate; a process that fails ends the job."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import ROOT, xla_flags

TINY = os.path.join(ROOT, "tests", "tiny_config.py")
TIMEOUT = 600


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))


def grain_jax(args, processes=1, devices=4, per_process=None, signal_when=None):
  """Runs `python -m grain_jax ARGS` as `processes` processes of one job (each with
  `devices` CPU devices; per_process(i) adds arguments); returns their CompletedProcesses.
  signal_when=(text, i, signum): once process 0 writes a line holding `text` to stderr,
  process i gets `signum` (as a preemption notice reaches one host)."""
  base = [sys.executable, "-m", "grain_jax", *args]
  if processes == 1:
    return [subprocess.run(base, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                           timeout=TIMEOUT)]
  port = _port()
  procs = [subprocess.Popen(base + ["--coordinator_address", f"127.0.0.1:{port}",
                                    "--num_processes", str(processes), "--process_id", str(i),
                                    *(per_process(i) if per_process else [])],
                            cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  done, seen = [], ""
  try:
    if signal_when:
      text, target, signum = signal_when
      while text not in seen and (line := procs[0].stderr.readline()):
        seen += line
      procs[target].send_signal(signum)
    for i, p in enumerate(procs):
      out, err = p.communicate(timeout=TIMEOUT)
      err = seen + err if i == 0 else err
      done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:
      p.kill()
  return done


def _stderrs(results) -> str:
  """The end of every process's stderr, for a failure message."""
  return "\n".join(f"process {k}: {r.stderr[-2500:]}" for k, r in enumerate(results))


def _ok(results):
  assert all(r.returncode == 0 for r in results), _stderrs(results)


def _weights(workdir):
  import jax
  from grain_jax.formats import weights
  tree, _, meta = weights.load_weights(os.path.join(workdir, "weights"))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}, meta


def _max_rel_diff(a, b):
  assert a.keys() == b.keys()
  return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-6)) for k in a)


def _log(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp_data")
  (root / "train").mkdir()
  (root / "held").mkdir()
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    img = Image.fromarray(getattr(skimage.data, name)())
    img.resize((img.width // 6, img.height // 6), Image.BICUBIC).save(root / "train" /
                                                                      f"{name}.png")
    Image.fromarray(getattr(skimage.data, name)()[100:164, 200:264]).save(root / "held" /
                                                                          f"{name}.png")
  return root


def _train(workdir, data, *extra, **launch):
  return grain_jax(["train", "--config", TINY, "--workdir", str(workdir), "--noprogress",
                    f"--config.data.train={data / 'train'}", "--config.data.crop=random",
                    "--config.data.random_scale=(0.5,1.0)", "--config.data.hflip=True",
                    "--config.batch_size=4", *extra], **launch)


def test_stage1_two_processes_train_like_one(data, tmp_path):
  """Random crops, flips, quantizer noise, BatchNorm statistics, the relativistic batch mean
  and the data position of each host: 2 x 2 devices end where 1 x 4 devices end, through two
  checkpoints and validations (weights/ and best/ exported by process 0 in between);
  validation and evaluate agree too."""
  val = ["--config.checkpoint_every=2", f"--config.data.eval={data / 'held'}",
         "--config.eval_every=2", "--config.max_steps=4"]
  one, two = tmp_path / "one", tmp_path / "two"
  _ok(_train(one, data, *val))
  run = _train(two, data, *val, processes=2, devices=2)
  _ok(run)
  assert "step 3:" in run[0].stderr and "step 3:" not in run[1].stderr  # process 0 reports
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
  assert sorted(os.listdir(two / "checkpoints" / "4" / "host_data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  a, meta = _weights(two)
  b, _ = _weights(one)
  assert meta["sources"]["trained_steps"] == 4
  assert _max_rel_diff(a, b) < 2e-5
  for r, s in zip(_log(two), _log(one), strict=True):
    assert r["step"] == s["step"] and abs(r["loss"] - s["loss"]) <= 1e-5 * abs(s["loss"])
  m2, m1 = (json.loads((w / "metrics.json").read_text()) for w in (two, one))
  assert m2["num_images"] == m1["num_images"] == 5
  for k in ("hr_inv_psnr", "hr_inv_ssim", "bicubic_psnr"):
    assert abs(m2[k] - m1[k]) < 1e-4, k
  assert (two / "best" / "score.json").exists()

  # evaluate with the same launch options: one metrics.json, equal to a single process's.
  ev = lambda out, **launch: grain_jax(
      ["evaluate", "--checkpoint", str(one), "--data", str(data / "held"), "--out", str(out),
       "--lpips", "off"], **launch)
  _ok(ev(tmp_path / "e1", devices=1))
  _ok(ev(tmp_path / "e2", processes=2, devices=2))
  e1, e2 = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e1", "e2"))
  assert e2["num_images"] == e1["num_images"] == 5 and e2["num_failed"] == 0
  for k in ("hr_psnr", "hr_ssim", "hr_inv_psnr", "hr_gan_psnr", "bicubic_psnr", "lr_psnr"):
    assert abs(e2[k] - e1[k]) < 1e-4, k
  rows = [list(csv.DictReader(open(tmp_path / e / "per_image.csv"))) for e in ("e1", "e2")]
  assert [r["file"] for r in rows[1]] == [r["file"] for r in rows[0]]


def test_a_signal_to_one_process_stops_both_with_a_checkpoint_and_they_resume(data, tmp_path):
  """A preemption notice reaching one host: SIGTERM to process 1 after step 2; the processes
  compare stop requests every step here, so both stop after the same step S, checkpoint it
  together (each its data position) and exit 75, both naming the signal and the process.
  The same command then resumes to S + 4 with a checkpoint every 2 steps (two or three in
  that run) and ends where one process of 4 devices ends after S + 4 steps."""
  w, one = tmp_path / "w", tmp_path / "one"
  # Many steps, so that a signal delivered late still lands before the end (the learning
  # rate is constant: max_steps changes nothing else of the training).
  stopped = _train(w, data, "--config.max_steps=200", "--config.checkpoint_every=0",
                   "--config.stop_check_every=1", processes=2, devices=2,
                   signal_when=("step 2:", 1, signal.SIGTERM))
  logs = _stderrs(stopped)
  assert [r.returncode for r in stopped] == [75, 75], logs
  found = [re.search(r"stopped at step (\d+) \(SIGTERM on process 1\) with a checkpoint",
                     r.stderr) for r in stopped]
  assert all(found), logs
  steps = sorted({int(m.group(1)) for m in found})
  assert len(steps) == 1 and 2 <= steps[0] < 200, (steps, logs)
  step = steps[0]
  assert os.listdir(w / "checkpoints") == [str(step)]
  assert sorted(os.listdir(w / "checkpoints" / str(step) / "host_data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  end = f"--config.max_steps={step + 4}"
  rerun = _train(w, data, end, "--config.checkpoint_every=2", processes=2, devices=2)
  _ok(rerun)
  assert f"resumed {w} at step {step}" in rerun[0].stderr
  assert f"step {step + 1}:" in rerun[0].stderr
  assert f"step {step + 1}:" not in rerun[1].stderr  # process 0 alone reports
  saved = [k for k in range(step + 1, step + 5) if k % 2 == 0 or k == step + 4]
  assert sorted(map(int, os.listdir(w / "checkpoints"))) == ([step] + saved)[-3:]  # keep 3
  _ok(_train(one, data, end, "--config.checkpoint_every=0"))
  a, meta = _weights(w)
  b, _ = _weights(one)
  assert meta["sources"]["trained_steps"] == step + 4
  # Summation order only (2 x 2 devices against 1 x 4): 1.3e-6 after 6 steps; a signal that
  # lands late makes the run longer.
  assert _max_rel_diff(a, b) < 1e-4
  for r, s in zip(_log(w), _log(one), strict=True):
    assert r["step"] == s["step"] and abs(r["loss"] - s["loss"]) <= 1e-5 * abs(s["loss"])


def test_stage4_two_processes_train_like_one(data, tmp_path):
  """The StyleGAN2 discriminator with lazy R1 (minibatch-stddev groups within a device): 4
  devices of 2 processes end where 1 device ends (stage 1 on 1, 2 and 4 devices of one
  process: test_training.py)."""
  extra = ["--config.checkpoint_every=3", "--config.max_steps=3",
           "--config.model.discriminator.stddev_group=1"]
  one, two = tmp_path / "one", tmp_path / "two"
  results_one = grain_jax(["train", "--config", f"{TINY}:finetune", "--workdir", str(one),
                           "--noprogress", f"--config.data.train={data / 'train'}",
                           "--config.batch_size=4", *extra], devices=1)
  _ok(results_one)
  results_two = grain_jax(["train", "--config", f"{TINY}:finetune", "--workdir", str(two),
                           "--noprogress", f"--config.data.train={data / 'train'}",
                           "--config.batch_size=4", *extra], processes=2, devices=2)
  _ok(results_two)
  a, meta = _weights(two)
  b, _ = _weights(one)
  assert meta["sources"]["stage"] == "finetune" and "discriminator" in meta["networks"]
  assert _max_rel_diff(a, b) < 2e-5
  log1, log2 = _log(one), _log(two)
  assert log1[0]["r1"] > 0 and abs(log2[0]["r1"] - log1[0]["r1"]) <= 1e-4 * log1[0]["r1"]


def test_a_failing_process_ends_the_job(data, tmp_path):
  """Process 1 finds no training data: it says so and leaves; the runtime ends process 0
  instead of letting it wait for process 1 forever."""
  empty = tmp_path / "empty"
  empty.mkdir()
  res = grain_jax(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--noprogress",
                   "--heartbeat_timeout=10", "--config.batch_size=4"], processes=2, devices=2,
                  per_process=lambda i: [f"--config.data.train={data / 'train' if i == 0 else empty}"])
  assert res[1].returncode == 2 and f"no training images in {empty}" in res[1].stderr
  # Process 0 learns it in its next collective, or from the runtime's heartbeat check.
  assert res[0].returncode != 0
  assert any(k in res[0].stderr for k in ("another process of the job stopped",
                                          "another task died")), res[0].stderr[-2000:]


def test_a_workdir_the_hosts_do_not_share_is_refused(data, tmp_path):
  """As if each host had its own disk: every process gets its own folder for --workdir."""
  res = grain_jax(["train", "--config", TINY, "--noprogress", "--config.batch_size=4",
                   f"--config.data.train={data / 'train'}"], processes=2, devices=2,
                  per_process=lambda i: ["--workdir", str(tmp_path / f"disk{i}" / "w")])
  for r in res:
    assert r.returncode == 2 and "is not one folder shared by all hosts" in r.stderr, r.stderr
    assert "(on process 1)" in r.stderr
  assert os.listdir(tmp_path / "disk0" / "w") == []  # nothing written, not even the marker
