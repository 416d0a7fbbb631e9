"""FID and KID between two image folders or .npz statistics, as `python -m pytorch_fid` does.

`grain-jax fid PATH_A PATH_B --inception FILE_OR_DIR` is the command. A path is a folder of
images (its top level only, the extensions pytorch-fid reads, sorted by name, each decoded
with PIL's convert('RGB') and scaled to [0, 1] as pytorch-fid's ToTensor) or a .npz file of
pytorch-fid's format (`mu`, `sigma`; `--save_stats` also stores `features`, which KID needs).
Features come from inception.FIDInceptionV3, jitted and split over the local devices.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grain_jax import files, inception, networks, prefetch
from grain_jax import progress as progress_bar

# pytorch-fid's IMAGE_EXTENSIONS (matched in lower case, as its glob does)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def load_inception(path: str) -> dict:
  """FID InceptionV3 variables from pytorch-fid's .pth file (read without unpickling code) or
  from a converted weights folder (grain-jax convert --inception) or training workdir."""
  from grain_jax import inference, weights

  if os.path.isdir(path):
    tree = weights.load_weights(inference.weights_dir(path))[0]
    if "inception" not in tree:
      raise ValueError(f"{path} holds no InceptionV3 weights; convert them with grain-jax "
                       f"convert --inception {inception.WEIGHTS_FILE}, or pass that file")
    return tree["inception"]
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; FID needs pytorch-fid's weights "
                            f"{inception.WEIGHTS_FILE} ({inception.WEIGHTS_URL})")
  return networks.convert("inception", path, None)[0]


class FeatureExtractor:
  """Jitted FID features of uint8 image batches, data-parallel over the local devices.

  `extractor(batch)` takes (n, H, W, 3) uint8 (n <= batch_size; padded here) and returns
  (n, dims) float32 numpy. A new image size compiles once more.
  """

  def __init__(self, variables, dims: int = 2048, batch_size: int = 50, devices=None):
    if dims not in inception.DIMS:
      raise ValueError(f"dims must be one of {inception.DIMS}, got {dims}")
    devices = list(devices or jax.local_devices())
    self.dims = dims
    self.batch_size = -(-max(1, batch_size) // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    replicated, self._data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    self.variables = jax.device_put(variables, replicated)
    net = inception.FIDInceptionV3(dims)
    # uint8 crosses to the device (4x less than float); / 255 in float32 as ToTensor does.
    self._fn = jax.jit(lambda v, x: net.apply(v, x.astype(jnp.float32) / 255.0),
                       in_shardings=(replicated, self._data), out_shardings=self._data)

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    n = len(batch)
    x = prefetch.pad_batch(list(batch), self.batch_size)
    return np.asarray(self._fn(self.variables, jax.device_put(x, self._data)))[:n]


def list_images(folder: str) -> list[str]:
  """The image files pytorch-fid takes from `folder`: top level, known extensions, sorted."""
  names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
           and os.path.splitext(n)[1][1:] in IMAGE_EXTENSIONS]
  return sorted(os.path.join(folder, n) for n in names)


def _read_rgb(path: str) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def images_of(folder: str) -> list[str]:
  """The image files of `folder`, refused when fewer than the 2 a FID needs."""
  paths = list_images(folder)
  if len(paths) < 2:
    raise ValueError(f"{folder}: FID needs at least 2 images, found {len(paths)} "
                     f"(looked for {', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
  return paths


def folder_features(folder: str, extractor: FeatureExtractor, workers: int = 4,
                    progress: bool = True) -> np.ndarray:
  """(N, dims) features of the images of `folder`. An unreadable image is an error naming
  it: a FID over the readable part alone would not be the number asked for."""
  paths = images_of(folder)

  def fail(path, err):
    raise err

  out = []
  stream = prefetch.prefetch(_read_rgb, paths, workers, depth=2 * extractor.batch_size)
  with progress_bar.bar(len(paths), os.path.basename(folder.rstrip("/")) or folder, "img",
                        progress) as bar:
    for group in prefetch.batches(stream, extractor.batch_size, fail):
      # Images of one size go through together (pytorch-fid needs one size per batch).
      shapes = {}
      for j, (_, img) in enumerate(group):
        shapes.setdefault(img.shape, []).append(j)
      feats = np.zeros((len(group), extractor.dims), np.float32)
      for idx in shapes.values():
        feats[idx] = extractor(np.stack([group[j][1] for j in idx]))
      out.append(feats)
      bar.update(len(group))
  return np.concatenate(out)


def load_statistics(path: str, dims: int | None = None, features: bool = False) -> dict:
  """{'mu', 'sigma'[, 'features'], 'path'} of a pytorch-fid .npz file; checks that they have
  `dims` dimensions and, with features=True, that the features (for KID) are there."""
  try:
    with np.load(path) as f:
      stats = {k: np.asarray(f[k]) for k in ("mu", "sigma", "features") if k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e})") from None
  if "mu" not in stats or "sigma" not in stats:
    raise ValueError(f"{path}: not FID statistics (pytorch-fid's .npz holds 'mu' and 'sigma'; "
                     f"found {', '.join(sorted(stats)) or 'neither'})")
  d = stats["mu"].shape
  if len(d) != 1 or stats["sigma"].shape != d * 2:
    raise ValueError(f"{path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} do not "
                     f"match")
  if dims is not None and d != (dims,):
    raise ValueError(f"{path}: statistics of {d[0]} dimensions, but {dims} were asked for "
                     f"(--dims / --fid_dims)")
  if features and "features" not in stats:
    raise ValueError(f"{path}: no features stored, and KID needs them (make the file with "
                     f"grain-jax fid --save_stats)")
  stats["path"] = os.path.abspath(path)
  return stats


def save_statistics(path: str, features: np.ndarray) -> None:
  """Writes pytorch-fid's .npz (mu, sigma in float64) plus the features (float32, for KID)."""
  mu, sigma = inception.statistics(features)
  with files.atomic_open(path, "wb") as f:
    np.savez(f, mu=mu, sigma=sigma, features=np.asarray(features, np.float32))


def statistics_of(path: str, extractor: FeatureExtractor | None, workers: int = 4,
                  progress: bool = True) -> dict:
  """{'mu', 'sigma'[, 'features']} of a folder of images or an .npz file."""
  if path.endswith(".npz"):
    return load_statistics(path, extractor.dims if extractor else None)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: neither a folder of images nor an .npz file")
  feats = folder_features(path, extractor, workers, progress)
  mu, sigma = inception.statistics(feats)
  return {"mu": mu, "sigma": sigma, "features": feats}


def fid_and_kid(a: dict, b: dict, kid: bool = False, **kid_options) -> dict:
  """{'fid'[, 'kid', 'kid_std']} between two statistics dicts (statistics_of)."""
  res = {"fid": inception.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])}
  if kid:
    res["kid"], res["kid_std"] = inception.kernel_inception_distance(
        a["features"], b["features"], **kid_options)
  return res


if __name__ == "__main__":
  from grain_jax import cli
  sys.exit(cli.run_command("fid", prog="python -m grain_jax.fid"))
