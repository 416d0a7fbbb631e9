"""The command line, `grain-jax` (and `python -m grain_jax`): argument parsing and the error
policy only. program.py builds the parser and turns known failures into one line and an exit
status; commands.py holds each subcommand's options and the one library call it makes;
config_flags.py reads `--config NAME|FILE --config.FIELD=VALUE`. Nothing in the library
imports this package: only grain_jax/__main__.py and the clone's train.py and
convert_weights.py do.
"""
from grain_jax.cli.program import main, run_command

__all__ = ["main", "run_command"]
