"""The README's promises: its quick start is what CI runs, every grain-jax command in it and in
docs/ parses with the real command's options, every relative link resolves, and its Python
example runs."""
import glob
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT
from grain_jax.cli import program
from grain_jax.cli.commands import COMMANDS


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _all_text():
  out = []
  for path in DOCS:
    with open(path) as f:
      out.append(f.read())
  return "\n".join(out)


def _commands(text):
  """Every `grain-jax ...` command of the README: indented lines (continuations joined) and
  inline code, without trailing comments and optional [...] parts."""
  text = text.replace("\\\n", " ")
  found = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("grain-jax "):
      line = re.sub(r"\s+#.*$", "", line)
      found.append(re.sub(r"\[[^\]]*\]", "", line))
  for span in re.findall(r"`(grain-jax [^`|]*)`", text):
    if "--" in span:  # a command, not the name of one
      found.append(span)
  return found


def test_quick_start_is_two_commands_and_ci_runs_the_second():
  text = _readme()
  quick = text.split("## Quick start", 1)[1].split("\n\n")[1]
  assert quick.splitlines() == [
      "    pip install -r requirements.txt && grain-jax train --config demo --workdir demo_run",
      "    bash .ci/run"]
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  assert "pip install -q -r requirements.txt" in ci and "python -m pytest -q" in ci
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    assert "-e .[torch,test,align,tpu]" in f.read()  # installs the grain-jax command the quick start runs


def test_every_readme_command_parses():
  commands = _commands(_all_text())
  assert len(commands) >= 15
  assert {shlex.split(c)[1] for c in commands} == set(COMMANDS)
  parser = program.build_parser()
  for line in commands:
    args, extra = parser.parse_known_args(shlex.split(line)[1:])
    if args.command.config_overrides:
      extra = [e for e in extra if not e.startswith("--config.")]
    assert not extra, (line, extra)


def test_python_example_runs(small_weights):
  """The README's example, on the small weights instead of weights/grain1024."""
  code = _readme().split("```python\n", 1)[1].split("```", 1)[0]
  assert 'grain_jax.load("weights/grain1024")' in code
  code = code.replace("weights/grain1024", small_weights)
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-2000:]
  assert "(1, 4, 4, 3) (1, 64, 64, 3)" in res.stdout


def _anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short_and_every_relative_link_resolves():
  assert len(_readme().splitlines()) <= 200
  assert len(DOCS) >= 6
  links = 0
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue  # a web address
      file, _, anchor = target.partition("#")
      full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
      assert os.path.exists(full), (path, target)
      if anchor:
        with open(full) as f:
          heads = [_anchor(h) for h in re.findall(r"(?m)^#+ (.*)$", f.read())]
        assert anchor in heads, (path, target, heads)
      links += 1
  assert links >= 20
