"""GRAIN in JAX: 64x extreme image rescaling with a StyleGAN2 prior (CVPR 2022).

The `grain-jax` command (also `python -m grain_jax`), one subcommand per job:

    grain-jax train --config demo --workdir demo_run     # the CPU demo: all four stages
    grain-jax convert --stylegan2 G.pt ... --out weights/grain1024
    grain-jax align --checkpoint weights/grain1024 photos/ --out aligned/
    grain-jax down --checkpoint weights/grain1024 photos/ --out lr/
    grain-jax up --checkpoint weights/grain1024 lr/ --out hr/
    grain-jax pipeline --config grain1024 --workdir runs/ --config.data.train=faces/

Every subcommand has --help. A known failure (a bad file, a wrong size, a missing weight) is
one line on stderr naming the problem, exit status 2; GRAIN_JAX_DEBUG=1 shows the traceback.
The clone's train.py and convert_weights.py are `grain-jax train` and `grain-jax convert`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
from absl import logging as absl_logging

from grain_jax.cli.commands import COMMANDS, EXIT_ERROR, Command
from grain_jax.train import stopping
from grain_jax.util import distributed, tpu


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the examples of a description as written and shows the defaults that say
  something."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (action.default not in (None, False, "", argparse.SUPPRESS) and action.option_strings
        and "%(default)" not in text):
      text += " (default: %(default)s)"
    return text


# ------------------------------------------------------------------------------ process setup

def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Keeps compiled XLA programs on disk, so a second run skips most compilation.

  The directory is `directory`, else $GRAIN_JAX_CACHE, else ~/.cache/grain_jax/xla; a cache
  the user configured for JAX is left as it is, and GRAIN_JAX_CACHE=off turns it off.
  Returns the directory in use (None if off).
  """
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = directory or os.environ.get("GRAIN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "grain_jax", "xla")
  if directory == "off":
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return directory


def quiet_logging(verbose: bool = False) -> None:
  """Our progress messages at INFO; the libraries' (Orbax, absl, JAX backends) only from
  WARNING, so a normal run prints what the user needs and nothing else. verbose=True (the
  --verbose flag) shows the libraries' INFO messages too."""
  level = logging.INFO if verbose else logging.WARNING
  logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                      stream=sys.stderr)
  logging.getLogger("grain_jax").setLevel(logging.INFO)
  for name in ("absl", "orbax", "jax._src.xla_bridge", "jax._src.distributed"):
    logging.getLogger(name).setLevel(level)
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)


def _add_multihost(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
      "several processes (hosts)",
      "Run the same command in every process; see README 'Running on clusters'.")
  g.add_argument("--multihost", action="store_true",
                 help="join a multi-process job, the cluster detected by JAX (TPU pod slice, "
                      "SLURM, Open MPI, Kubernetes) unless the three options below are given")
  g.add_argument("--coordinator_address", metavar="HOST:PORT",
                 help="process 0's address and a free port (implies --multihost)")
  g.add_argument("--num_processes", type=int, metavar="N", help="processes in the job")
  g.add_argument("--process_id", type=int, metavar="I", help="this process, 0..N-1")
  g.add_argument("--heartbeat_timeout", type=int, default=100, metavar="SECONDS",
                 help="a process silent this long is taken as dead and the job ends")


def _join_job(args) -> None:
  """Joins the multi-process job the --multihost options describe (if any)."""
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if args.multihost or any(v is not None for v in explicit):
    distributed.initialize(*explicit, heartbeat_timeout_s=args.heartbeat_timeout)


# ------------------------------------------------------------------------------ the program

def _build(parser: argparse.ArgumentParser, c: Command) -> None:
  c.add_arguments(parser)
  if c.multihost:
    _add_multihost(parser)
  parser.add_argument("--verbose", action="store_true",
                      help="also show the libraries' INFO messages (Orbax, absl, JAX)")
  parser.set_defaults(command=c)


def build_parser(prog: str = "grain-jax") -> argparse.ArgumentParser:
  """The parser of `prog` with every subcommand."""
  parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_Formatter)
  sub = parser.add_subparsers(metavar="COMMAND", required=True)
  for c in COMMANDS.values():
    _build(sub.add_parser(c.name, help=c.help, description=c.description,
                          formatter_class=_Formatter), c)
  return parser


def _run(parser: argparse.ArgumentParser, argv: list[str], subcommands: bool) -> int:
  args, extra = parser.parse_known_args(argv)
  c: Command = args.command
  prog = f"{parser.prog} {c.name}" if subcommands else parser.prog
  if extra and not c.config_overrides:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  quiet_logging(args.verbose)
  tpu.quiet_libtpu_off_tpu()  # before JAX starts its backends
  enable_compilation_cache()
  try:
    if c.multihost:
      _join_job(args)
    return c.run(args, extra)
  except stopping.Interrupted as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return stopping.EXIT_INTERRUPTED
  except (OSError, ValueError, RuntimeError) as e:
    # Known failures: bad files, sizes, configs, missing weights, out of memory.
    if os.environ.get("GRAIN_JAX_DEBUG"):
      raise
    lines = str(e).strip().splitlines() or [type(e).__name__]
    more = " (GRAIN_JAX_DEBUG=1 shows more)" if len(lines) > 1 else ""
    if _lost_peer(e):
      lines[0] = f"another process of the job stopped; see its log ({lines[0]})"
    print(f"{prog}: error: {lines[0]}{more}", file=sys.stderr)
    _end_job_if_multiprocess()
    return EXIT_ERROR


def _lost_peer(e: BaseException) -> bool:
  """Whether `e` is a collective that failed because another process of the job is gone."""
  if not jax.distributed.is_initialized() or jax.process_count() < 2:
    return False
  text = str(e)
  return type(e).__name__.endswith("RuntimeError") and any(
      k in text for k in ("Gloo", "Connection closed by peer", "coordination service",
                          "heartbeat"))


def _end_job_if_multiprocess() -> None:
  """In a multi-process job, leaves at once: a graceful exit would wait for the other
  processes at the shutdown barrier while they wait for this one in their next collective.
  The distributed runtime sees this process gone and ends the others."""
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_ERROR)


def main(argv: list[str] | None = None, prog: str = "grain-jax") -> int:
  """Runs `grain-jax ARGV`; returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return _run(build_parser(prog), argv, subcommands=True)


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
  """One subcommand as a program of its own (the clone's train.py and convert_weights.py)."""
  c = COMMANDS[name]
  parser = argparse.ArgumentParser(prog=prog or f"grain-jax {name}",
                                   description=c.description, formatter_class=_Formatter)
  _build(parser, c)
  return _run(parser, sys.argv[1:] if argv is None else list(argv), subcommands=False)
