"""The grain-jax command: help for every subcommand, one error style, configs by name, and the
package installed outside its clone."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from grain_jax import cli
from grain_jax.cli import commands, config_flags
from grain_jax.nets import registry
from grain_jax.nets.model import GRAIN

SAMPLE = os.path.join(ROOT, "grain_jax", "samples", "astronaut_face.png")
SUBCOMMANDS = ("convert", "align", "down", "up", "evaluate", "fid", "train", "pipeline", "bench", "demo")


def test_the_command_has_exactly_the_documented_subcommands():
  assert tuple(commands.COMMANDS) == SUBCOMMANDS


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_every_subcommand(sub, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([sub, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: grain-jax {sub} ")
  assert "grain-jax" in out.split("options:")[0]  # a description with examples


def _error(capsys, argv):
  rc = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  return rc, err


def test_known_failures_are_one_line_and_status_2(capsys, tmp_path):
  (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
  cases = [
      (["up", "--checkpoint", str(tmp_path / "nothing"), SAMPLE, "--out", str(tmp_path)],
       "not a grain_jax weights directory"),
      (["convert", "--fusion", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "w")],
       "bad.pt: not a readable PyTorch checkpoint"),
      (["convert", "--out", str(tmp_path / "w")], "nothing to convert"),
      (["train", "--config", "stage9", "--workdir", str(tmp_path)],
       "--config stage9: neither a config file nor a built-in config (1024, small, invrrdb"),
      (["train", "--config", "demo", "--config.nope=1", "--show_config"],
       "--config demo has no field 'nope'"),
      (["train", "--config", "demo", "--config.batch_size=two", "--show_config"],
       "flag --config.batch_size=two: invalid literal for int()"),
      (["train", "--config", "demo", "stray", "--show_config"], "unexpected arguments: stray"),
      (["evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data", SAMPLE,
        "--out", str(tmp_path / "e")], "not a grain_jax weights directory"),
  ]
  for argv, said in cases:
    rc, err = _error(capsys, argv)
    assert rc == 2 and len(err) == 1, (argv, err)
    assert err[0].startswith(f"grain-jax {argv[0]}: error: ") and said in err[0], (argv, err)
  assert not (tmp_path / "w").exists()


def test_configs_by_name_overrides_and_show_config(capsys):
  assert cli.main(["train", "--config", "demo", "--config.batch_size=8", "--show_config"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"^batch_size: 8$", out, re.M) and "pipeline:" in out
  for name in config_flags.BUILTIN:
    cfg = config_flags.load(name)
    assert cfg.model.hr_size in (64, 1024), name
  assert config_flags.load("fusion").stage == "fusion"
  # A file in the clone's configs/ gives the same config as its built-in name.
  for name, file in (("demo", "demo.py"), ("grain1024", "grain1024.py"),
                     ("invrrdb", "stage1_invrrdb.py"), ("finetune", "stage4_finetune.py")):
    assert config_flags.load(os.path.join(ROOT, "configs", file)) == config_flags.load(name)


def test_hr_size_alone_gives_the_original_layout_at_that_size():
  """--config.model.hr_size=256: rosinality's 256 px widths, 14 W+ codes, five decoder
  levels (16 ... 256 px); every network builds."""
  cfg = config_flags.load("1024", ["--config.model.hr_size=256"]).model
  model = GRAIN.from_config(cfg)
  assert model.generator.n_latent == 14 and model.rescaler.n_down == 4
  assert tuple(model.generator.channels) == (512, 512, 512, 512, 512, 256, 128)
  assert tuple(model.rescaler.decoder_blocks) == (3, 3, 3)
  for name in registry.NETWORKS:
    assert registry.expected_variables(name, cfg), name
  # A field that must change with lr_size is named (4 head convs reach 1x1 from at most 16
  # px; more convs keep 1x1, as the original's 4 do at lr_size 4).
  bad = config_flags.load("1024", ["--config.model.lr_size=32"]).model
  with pytest.raises(ValueError, match="fea2code.head_channels needs at least log2"):
    registry.build("fea2code", bad)
  assert registry.build("fea2code", config_flags.load("1024", ["--config.model.lr_size=8"]).model)


def test_no_sys_path_edits_in_the_package():
  for root, _, files in os.walk(os.path.join(ROOT, "grain_jax")):
    for f in files:
      if f.endswith(".py"):
        with open(os.path.join(root, f)) as fh:
          assert "sys.path" not in fh.read(), f


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """`pip install` of a copy of the clone's package into a folder of its own (no
  dependencies: they are this environment's), the way a user installs it."""
  tmp = tmp_path_factory.mktemp("install")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(ROOT, name), src)
  shutil.copytree(os.path.join(ROOT, "grain_jax"), src / "grain_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  target = tmp / "site"
  res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(src)],
                       capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  elsewhere = tmp / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target))
  run = lambda *args: subprocess.run(list(args), cwd=elsewhere, env=env, capture_output=True,
                                     text=True)
  return target, elsewhere, run


# Imports every module of grain_jax and prints their names: run by the installed package
# and by the clone, the two lists must be equal.
IMPORT_ALL = ("import importlib, pkgutil, grain_jax\n"
              "names = sorted(m.name for m in pkgutil.walk_packages(grain_jax.__path__, "
              "'grain_jax.'))\n"
              "for n in names: importlib.import_module(n)\n"
              "print(' '.join(names))")


def test_installed_package_runs_outside_the_clone(installed):
  target, elsewhere, run = installed
  res = run(sys.executable, "-c", "import grain_jax; print(grain_jax.__file__)")
  assert res.returncode == 0 and res.stdout.startswith(str(target)), res.stderr
  script = str(target / "bin" / "grain-jax")
  res = run(script, "--help")
  assert res.returncode == 0 and "usage: grain-jax" in res.stdout, res.stderr
  res = run(script, "up", "--help")
  assert res.returncode == 0 and "usage: grain-jax up" in res.stdout, res.stderr
  # Every module was installed and imports (every subcommand's help:
  # test_help_of_every_subcommand).
  res = run(sys.executable, "-c", IMPORT_ALL)
  clone = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True,
                         text=True)
  assert res.returncode == 0 and res.stdout.split() == clone.stdout.split(), res.stderr
  # The report's page is package data, read when a report is written.
  res = run(sys.executable, "-c", "from grain_jax.eval import report; print(report.TEMPLATE, "
            "len(report.page_template()))")
  assert res.returncode == 0 and int(res.stdout.split()[1]) > 1000, res.stderr
  # The built-in configs and the bundled picture come with the package.
  res = run(script, "train", "--config", "demo", "--show_config")
  assert res.returncode == 0 and "pipeline:" in res.stdout, res.stderr
  res = run(sys.executable, "-m", "grain_jax", "demo", "--out", "demo_out")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "equals the in-memory result: True" in res.stdout
  assert (elsewhere / "demo_out" / "weights" / "grain_weights.json").exists()
  assert res.stderr.strip() == "", res.stderr  # quiet: no library INFO lines
