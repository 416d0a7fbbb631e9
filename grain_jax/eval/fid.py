"""FID and KID between two image folders or .npz statistics, as `python -m pytorch_fid` does.

`grain-jax fid PATH_A PATH_B --inception FILE_OR_DIR` is the command. A path is a folder of
images (its top level only, the extensions pytorch-fid reads, sorted by name, each decoded
with PIL's convert('RGB') and scaled to [0, 1] as pytorch-fid's ToTensor) or a .npz file of
pytorch-fid's format (`mu`, `sigma`; `--save_stats` also stores `features`, which KID needs).
Features come from inception.FIDInceptionV3, jitted and split over the local devices. The
maths of both distances (pytorch-fid's FID, torch-fidelity's KID) are here too; evaluation
and training's validation compute theirs with them.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from grain_jax.formats.weights import load_weights, weights_dir
from grain_jax.nets import inception, registry
from grain_jax.util import files, prefetch
from grain_jax.util.progress import progress_bar

# pytorch-fid's IMAGE_EXTENSIONS (matched in lower case, as its glob does)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults


def load_inception(path: str) -> dict:
  """FID InceptionV3 variables from pytorch-fid's .pth file (read without unpickling code) or
  from a converted weights folder (grain-jax convert --inception) or training workdir."""
  if os.path.isdir(path):
    tree = load_weights(weights_dir(path))[0]
    if "inception" not in tree:
      raise ValueError(f"{path} holds no InceptionV3 weights; convert them with grain-jax "
                       f"convert --inception {inception.WEIGHTS_FILE}, or pass that file")
    return tree["inception"]
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; FID needs pytorch-fid's weights "
                            f"{inception.WEIGHTS_FILE} ({inception.WEIGHTS_URL})")
  return registry.convert("inception", path, None)[0]


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
  with progress_bar(len(paths), os.path.basename(folder.rstrip("/")) or folder, "img",
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
  mu, sigma = statistics(features)
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
  mu, sigma = statistics(feats)
  return {"mu": mu, "sigma": sigma, "features": feats}


def fid_and_kid(a: dict, b: dict, kid: bool = False, subsets: int = KID_SUBSETS,
                subset_size: int = KID_SUBSET_SIZE) -> dict:
  """{'fid'[, 'kid', 'kid_std']} between two statistics dicts ({'mu', 'sigma'[, 'features']},
  statistics_of); KID needs both sides' features."""
  res = {"fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])}
  if kid:
    res["kid"], res["kid_std"] = kernel_inception_distance(a["features"], b["features"],
                                                           subsets, subset_size)
  return res


def run(paths: tuple[str, str], inception_source: str, dims: int = 2048, batch_size: int = 50,
        kid: bool = False, save_stats: bool = False, workers: int = 4,
        progress: bool = True) -> dict:
  """`grain-jax fid A B`: FID (and KID) between two folders or .npz files, printed; with
  save_stats, the statistics of folder A written to the .npz file B instead. Every path is
  checked (an .npz read, a folder's images counted) before the network is loaded or any
  image is read. Returns the distances ({} with save_stats)."""
  a, b = paths
  if save_stats:
    if not b.endswith(".npz"):
      raise ValueError(f"--save_stats writes an .npz file; got {b}")
    files.check_can_create(os.path.dirname(os.path.abspath(b)))
  paths = (a,) if save_stats else (a, b)
  given = {p: load_statistics(p, dims, features=kid) for p in paths if p.endswith(".npz")}
  for p in paths:
    if p not in given and not os.path.isdir(p):
      raise FileNotFoundError(f"{p}: neither a folder of images nor an .npz file")
    if p not in given:
      images_of(p)  # an empty folder is refused before the other one is read
  extractor = (FeatureExtractor(load_inception(inception_source), dims, batch_size)
               if any(p not in given for p in paths) else None)
  stats = [given.get(p) or statistics_of(p, extractor, workers, progress) for p in paths]
  if save_stats:
    save_statistics(b, stats[0]["features"])
    print(f"wrote the statistics of {len(stats[0]['features'])} images to {b}")
    return {}
  res = fid_and_kid(*stats, kid)
  print(f"FID: {res['fid']:.6f}")
  if kid:
    print(f"KID: {res['kid']:.6f} +- {res['kid_std']:.6f}")
  return res


# ------------------------------------------------------------------------------ the maths

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """FID between two Gaussians, computed as pytorch-fid's calculate_frechet_distance
  (float64, scipy.linalg.sqrtm, eps on the diagonal if the product is singular)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                   np.float64))
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(
      np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different dimensions: {mu1.shape} and {mu2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of (N, dims) features in float64, as pytorch-fid."""
  f = np.asarray(features, np.float64)
  return np.mean(f, axis=0), np.cov(f, rowvar=False)


def kernel_inception_distance(features_a, features_b, subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3,
                              gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020) -> tuple[float, float]:
  """KID as torch-fidelity computes it (its defaults): the unbiased MMD^2 estimate with the
  polynomial kernel (x.y * gamma + coef0)^degree, gamma = 1 / dims, over `subsets` random
  subsets of `subset_size` features of each set (drawn without replacement by a
  numpy RandomState(seed), b's subset after a's); returns (mean, std) over the subsets.

  torch-fidelity refuses sets smaller than subset_size; here the subset size is then the
  smaller set's size (what it recommends for small test sets, via --kid-subset-size).
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or a.shape[1:] != b.shape[1:]:
    raise ValueError(f"features of different shapes: {a.shape} and {b.shape}")
  m = min(subset_size, len(a), len(b))
  if m < 2:
    raise ValueError("KID needs at least 2 images per set")
  gamma = 1.0 / a.shape[1] if gamma is None else gamma
  kernel = lambda x, y: (x @ y.T * gamma + coef0) ** degree
  rng = np.random.RandomState(seed)
  mmds = np.zeros(subsets)
  for i in range(subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_diagonal = (k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))
    mmds[i] = off_diagonal / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)
  return float(np.mean(mmds)), float(np.std(mmds))
