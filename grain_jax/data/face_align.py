"""Face alignment for your own photos, as FFHQ aligned its faces (`grain-jax align`).

    grain-jax align photos/ --out aligned/ --checkpoint weights/grain1024
    grain-jax down --checkpoint weights/grain1024 aligned/ --out lr/

GRAIN's StyleGAN2 prior, like every FFHQ-trained generator, knows faces only where FFHQ put
them: eyes level at a fixed height and distance, the face filling the frame the same way. A
photo cropped any other way upscales badly. This finds every face (dlib: HOG or CNN
detector, then the 68-point landmark model) and cuts it out with FFHQ's recipe (NVIDIA's
ffhq-dataset `recreate_aligned_images`): an oriented square from the eyes and the mouth,
large photos first shrunk, the square's outside filled by blurred reflection, the square
resampled to transform_size (4 x size, as FFHQ) and resized to size.

Every face is written as OUT/NAME_faceK.png (K = 0 for the largest), NAME the input's path
relative to its folder without extension; OUT/faces.json records each face's source, box,
detector score, 68 landmarks and quad (source pixel coordinates) and the affine map from the
aligned pixels back to the source's. The size is --size, else the --checkpoint's HR size (so
`down` takes the faces as they are), else 1024. A photo without a face is named in a
warning; the exit status is then 1, as for an unreadable file, and 2 if no input gave a face.

Needs the `align` extra (dlib and its models): pip install "grain-jax[align]". dlib's
68-point model was trained on iBUG 300-W, whose licence excludes commercial use.

In Python: grain_jax.align(image) -> [(aligned uint8 HxWx3, info dict)] (this module's
`align`).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from grain_jax.formats import images
from grain_jax.formats.weights import read_meta, weights_dir
from grain_jax.util import files, prefetch
from grain_jax.util.progress import progress_bar

INSTALL_HINT = 'pip install "grain-jax[align]"'
DETECTORS = ("hog", "cnn")
# Detection on the photo upsampled once, as FFHQ and pSp: finds faces down to ~40 px wide.
UPSAMPLE = 1
LANDMARKS_MODEL = "shape_predictor_68_face_landmarks.dat"
CNN_MODEL = "mmod_human_face_detector.dat"
RECORD = "faces.json"
FORMAT = "grain_jax.align/1"


class MissingExtra(ImportError, RuntimeError):
  """dlib or its models are not installed. An ImportError, and a RuntimeError so the command
  reports it in one line."""


# ------------------------------------------------------------------------------ dlib

def _dlib():
  try:
    import dlib  # deferred: the optional [align] extra
  except ImportError:
    raise MissingExtra(f"face alignment needs dlib, which is not installed: "
                       f"{INSTALL_HINT}") from None
  return dlib


def model_file(name: str) -> str:
  """The path of one of face_recognition_models' files.

  Found without importing the package: its __init__ imports pkg_resources, which current
  setuptools no longer ships.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  folders = list(spec.submodule_search_locations or []) if spec else []
  for folder in folders:
    path = os.path.join(folder, "models", name)
    if os.path.isfile(path):
      return path
  raise MissingExtra(f"face alignment needs dlib's model {name} (package "
                     f"face-recognition-models), which is not installed: {INSTALL_HINT}")


def check_available(detector: str = "hog") -> None:
  """Raises MissingExtra (naming the pip command) unless dlib and the models `detector`
  needs are installed; a command calls it before reading any photo."""
  if detector not in DETECTORS:
    raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
  _dlib()
  model_file(LANDMARKS_MODEL)
  if detector == "cnn":
    model_file(CNN_MODEL)


# Loaded once per process: the landmark model is 100 MB.
@functools.lru_cache(maxsize=None)
def _predictor(path: str):
  return _dlib().shape_predictor(path)


@functools.lru_cache(maxsize=None)
def _hog():
  return _dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def _cnn(path: str):
  return _dlib().cnn_face_detection_model_v1(path)


def detect(image: np.ndarray, detector: str = "hog", min_score: float = 0.0) -> list[dict]:
  """Faces of an HxWx3 uint8 RGB image: [{box, score, landmarks}], largest box first.

  box is [left, top, right, bottom] in pixels (right and bottom exclusive; it may reach
  outside the image); score is the HOG detector's score or the CNN's confidence, and
  detections scoring below min_score are dropped (0: dlib's own threshold, as FFHQ; clear
  frontal faces mostly score above 0.5 with HOG, and false detections below); landmarks
  are dlib's 68 points (x, y), pixel centres at integers.
  """
  check_available(detector)
  image = np.ascontiguousarray(image, np.uint8)
  if detector == "hog":
    rects, scores, _ = _hog().run(image, UPSAMPLE, 0.0)  # = detector(image, 1), with scores
  else:
    found = _cnn(model_file(CNN_MODEL))(image, UPSAMPLE)
    rects, scores = [d.rect for d in found], [d.confidence for d in found]
  predictor = _predictor(model_file(LANDMARKS_MODEL))
  faces = []
  for r, s in zip(rects, scores):
    if s < min_score:
      continue
    lm = [[p.x, p.y] for p in predictor(image, r).parts()]
    faces.append({"box": [r.left(), r.top(), r.right() + 1, r.bottom() + 1],
                  "score": float(s), "landmarks": lm})
  # Largest first; equal boxes by score, then position, so the order is always the same.
  area = lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])
  faces.sort(key=lambda f: (-area(f), -f["score"], f["box"][1], f["box"][0]))
  return faces


# ------------------------------------------------------------------------------ the recipe

def ffhq_quad(landmarks) -> np.ndarray:
  """FFHQ's oriented square from 68 landmarks: corners (4, 2) in source pixel coordinates,
  in the order top-left, bottom-left, bottom-right, top-right of the aligned image.

  Its x axis runs along the eye line turned towards the perpendicular of the eye-to-mouth
  line (their sum), so tilted heads come out upright; its half-size is the larger of twice
  the eye distance and 1.8 x the eye-to-mouth distance, so a frontal face keeps FFHQ's
  scale and a face seen from the side is not cut; its centre is a tenth of the way from the
  eyes to the mouth.
  """
  lm = np.asarray(landmarks, np.float64)
  eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
  eye_avg = (eye_left + eye_right) * 0.5
  eye_to_eye = eye_right - eye_left
  mouth_avg = (lm[48] + lm[54]) * 0.5
  eye_to_mouth = mouth_avg - eye_avg
  x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
  x /= np.hypot(*x)
  x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
  y = np.flipud(x) * [-1, 1]
  c = eye_avg + eye_to_mouth * 0.1
  return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def output_to_source(quad, size: int) -> np.ndarray:
  """The affine map (2, 3) from aligned pixel coordinates (u, v) to source pixel coordinates
  (pixel centres at integers in both): source = M @ [u, v, 1].

  Exact for the square as resampled; for photos shrunk first (faces over 2 x size) within
  about half a pixel of the shrunk photo.
  """
  q = np.asarray(quad, np.float64)
  ex, ey = (q[3] - q[0]) / size, (q[1] - q[0]) / size  # one aligned pixel right, down
  return np.stack([ex, ey, q[0] + 0.5 * (ex + ey)], axis=1)


def to_source(info: dict, points) -> np.ndarray:
  """Aligned-image points (N, 2) -> the source photo's pixel coordinates (info from align)."""
  m = np.asarray(info["output_to_source"], np.float64)
  p = np.asarray(points, np.float64).reshape(-1, 2)
  return p @ m[:, :2].T + m[:, 2]


def _pad_reflect_blend(img: Image.Image, pad, qsize: float) -> Image.Image:
  """FFHQ's fill outside the photo: mirror it, blur the mirror (more with the distance from
  the edge) and fade it to the photo's median colour, so no hard seam or black corner
  reaches the generator."""
  left, top, right, bottom = (int(p) for p in pad)
  a = np.pad(np.asarray(img, np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")
  h, w, _ = a.shape
  yy, xx = np.ogrid[:h, :w]
  # 0 inside the photo, rising to 1 at the outer edge of the padding (float64, as FFHQ's).
  xx, yy = xx.astype(np.float64), yy.astype(np.float64)
  mask = np.maximum(1.0 - np.minimum(xx / left, (w - 1 - xx) / right),
                    1.0 - np.minimum(yy / top, (h - 1 - yy) / bottom))[..., None]
  blur = qsize * 0.02
  a += (ndimage.gaussian_filter(a, [blur, blur, 0]) - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
  a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
  return Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")


def warp(image: np.ndarray, quad, size: int, transform_size: int | None = None,
         enable_padding: bool = True) -> np.ndarray:
  """Resamples the square `quad` (ffhq_quad) of an HxWx3 uint8 image to size x size, as FFHQ.

  Steps: a photo much larger than the output is first shrunk by an integer factor (Lanczos)
  so the later bilinear resampling does not alias; it is cropped to the square plus a
  border; where the square reaches outside the photo it is padded (_pad_reflect_blend);
  the square is resampled bilinearly to transform_size (default 4 x size: supersampled,
  then Lanczos-resized to size, a sharper result than bilinear at size).
  """
  transform_size = transform_size or 4 * size
  quad = np.array(quad, np.float64)
  qsize = float(np.hypot(*(quad[3] - quad[0])))
  img = Image.fromarray(np.ascontiguousarray(image, np.uint8), "RGB")

  shrink = int(np.floor(qsize / size * 0.5))
  if shrink > 1:
    img = img.resize((int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink))),
                     Image.LANCZOS)
    quad /= shrink
    qsize /= shrink

  border = max(int(np.rint(qsize * 0.1)), 3)
  lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
  crop = (max(lo[0] - border, 0), max(lo[1] - border, 0),
          min(hi[0] + border, img.size[0]), min(hi[1] + border, img.size[1]))
  if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
    img = img.crop(crop)
    quad -= crop[:2]

  lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
  pad = (max(border - lo[0], 0), max(border - lo[1], 0),
         max(hi[0] - img.size[0] + border, 0), max(hi[1] - img.size[1] + border, 0))
  if enable_padding and max(pad) > border - 4:
    pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
    img = _pad_reflect_blend(img, pad, qsize)
    quad += pad[:2]

  # PIL's QUAD takes the corners in its continuous coordinates (pixel centres at +0.5).
  img = img.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(),
                      Image.BILINEAR)
  if transform_size != size:
    img = img.resize((size, size), Image.LANCZOS)
  return np.asarray(img)


def _as_uint8_rgb(image) -> np.ndarray:
  """A path, a uint8 array (HxW, HxWx3, HxWx4), a float HxWx3 in [0, 1] (images.read_image)
  or a batch of one (1, H, W, 3) in [-1, 1] (grain_jax.read_image) -> HxWx3 uint8 RGB."""
  if isinstance(image, (str, os.PathLike)):
    image, _ = images.read_image(os.fspath(image))
  a = np.asarray(image)
  if a.ndim == 4 and a.shape[0] == 1 and a.dtype != np.uint8:
    return images.to_uint8(a[0])
  if a.dtype == np.uint8:
    return a if a.ndim == 3 and a.shape[2] == 3 else np.asarray(
        np.rint(images.decode_array(a)[0] * 255.0), np.uint8)
  if a.ndim == 3 and a.shape[2] == 3 and np.issubdtype(a.dtype, np.floating):
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
  raise ValueError(f"expected an image path, an HxWx3 uint8 array, an HxWx3 float array in "
                   f"[0, 1] or a (1, H, W, 3) batch in [-1, 1]; got {a.dtype} {a.shape}")


def align_landmarks(image, landmarks, size: int = 1024, transform_size: int | None = None,
                    ) -> tuple[np.ndarray, dict]:
  """One face, from its 68 landmarks (source pixel coordinates): (aligned size x size x 3
  uint8, info with the quad and the map back to the source; see align)."""
  image = _as_uint8_rgb(image)
  if size < 1 or (transform_size is not None and transform_size < 1):
    raise ValueError(f"size and transform_size must be >= 1, got {size} and {transform_size}")
  quad = ffhq_quad(landmarks)
  out = warp(image, quad, size, transform_size)
  info = {"landmarks": np.asarray(landmarks).astype(int).tolist(),
          "quad": quad.tolist(), "size": int(size),
          "transform_size": int(transform_size or 4 * size),
          "source_size": [int(image.shape[1]), int(image.shape[0])],
          "output_to_source": output_to_source(quad, size).tolist()}
  return out, info


def align(image, size: int = 1024, detector: str = "hog", transform_size: int | None = None,
          min_score: float = 0.0) -> list[tuple[np.ndarray, dict]]:
  """Every face of a photo, aligned as FFHQ: [(size x size x 3 uint8, info)], largest first.

  image: a path, an HxWx3 uint8 array, or what grain_jax.read_image / images.read_image
  return. detector: 'hog' (fast, frontal faces) or 'cnn' (dlib's MMOD CNN: also turned and
  small faces, seconds per photo on a CPU). transform_size: the resampling size before the
  final Lanczos resize (default 4 x size, FFHQ's; pSp uses transform_size = size = 256).
  min_score: drop detections scoring lower (see detect).

  info (JSON-ready): box [left, top, right, bottom] and score of the detection, landmarks
  (68 x [x, y]), quad (the aligned image's top-left, bottom-left, bottom-right and top-right
  corners in the source), source_size [w, h], size, transform_size, and output_to_source,
  the 2x3 affine map from aligned to source pixel coordinates (see to_source) with which the
  face can be put back. [] if no face is found. Raises MissingExtra without dlib.
  """
  check_available(detector)
  image = _as_uint8_rgb(image)
  results = []
  for face in detect(image, detector, min_score):
    out, info = align_landmarks(image, face["landmarks"], size, transform_size)
    results.append((out, {"box": face["box"], "score": face["score"], **info}))
  return results


# ------------------------------------------------------------------------------ the command

def plan(inputs: list[str], out_dir: str):
  """(image files, their output stems, missing inputs). Refuses, before anything is written,
  when there is no image at all, two inputs would share outputs, or an output would
  overwrite an input."""
  found, missing = images.collect_inputs(inputs)
  stems = [n[:-len("_face<K>.png")] for n in images.output_names(found, "_face<K>.png")]
  targets = {os.path.realpath(os.path.join(out_dir, s)) for s in stems}
  for f in found:
    m = re.fullmatch(r"(.*)_face\d+\.png", os.path.realpath(f.path))
    if m and m.group(1) in targets:
      raise ValueError(f"writing to {out_dir} would overwrite the input {f.path}; "
                       f"choose another --out")
  return found, stems, missing


def _read_record(path: str) -> list[dict]:
  """The faces of an earlier run's faces.json in the same folder (kept unless rewritten)."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return []
  return record.get("faces", []) if isinstance(record, dict) else []


def _write_record(path: str, faces: list[dict]) -> None:
  """faces.json, one face a line (landmarks would take hundreds of indented lines),
  written atomically."""
  lines = ",\n  ".join(json.dumps(f, allow_nan=False) for f in faces)
  with files.atomic_open(path) as f:
    f.write(f'{{"format": "{FORMAT}", "faces": [\n  {lines}\n]}}\n')


def face_size(size: int | None, checkpoint: str | None = None) -> int:
  """The aligned faces' size: `size`, else the HR size of `checkpoint` (a weights directory
  or training workdir, so that `grain-jax down` takes the faces as they are), else 1024. A
  size that differs from the checkpoint's is kept, with a warning."""
  if checkpoint:
    hr = int(read_meta(weights_dir(checkpoint))["model"]["hr_size"])
    if size is not None and size != hr:
      print(f"warning: --size {size} is not the checkpoint's HR size {hr}: grain-jax down "
            f"will resize the faces", file=sys.stderr)
    size = hr if size is None else size
  return 1024 if size is None else size


def align_files(inputs: list[str], out_dir: str, size: int = 1024, detector: str = "hog",
                transform_size: int | None = None, min_score: float = 0.0, workers: int = 2,
                progress: bool = True) -> dict:
  """`grain-jax align`: aligns every face of the image files and folders `inputs` into
  out_dir (NAME_faceK.png and faces.json; see the module's doc). Returns counts: inputs,
  faces, no_face and failed (lists of input paths)."""
  check_available(detector)
  out_dir = files.check_can_create(out_dir)
  found, stems, missing = plan(inputs, out_dir)
  report = prefetch.Report(lambda s: tqdm.write(s, file=sys.stderr))
  for m in missing:
    report.fail(m, "no such file or folder")
  transform_size = transform_size or 4 * size
  bar = progress_bar(len(found), "align", "img", progress)
  faces, no_face = [], []

  def load(i):
    return images.read_image(found[i].path)

  for i, img, err in prefetch.prefetch(load, range(len(found)), workers, 4):
    f = found[i]
    try:
      if err is not None:
        raise err
      rgb01, note = img
      report.note(f.name, note)
      results = align(_as_uint8_rgb(rgb01), size, detector, transform_size, min_score)
    except (OSError, ValueError, RuntimeError) as e:
      report.fail(f.path, e)
      bar.update(1)
      continue
    if not results:
      no_face.append(f.path)
      tqdm.write(f"warning: no face found in {f.path}", file=sys.stderr)
    for k, (out, info) in enumerate(results):
      name = f"{stems[i]}_face{k}.png"
      images.write_png(os.path.join(out_dir, name), out)
      faces.append({"file": name, "source": os.path.abspath(f.path), "face": k,
                    "detector": detector, **info})
    bar.update(1)
  bar.close()

  if faces:
    record = os.path.join(out_dir, RECORD)
    written = {r["file"] for r in faces}
    kept = [r for r in _read_record(record) if r.get("file") not in written]
    _write_record(record, kept + faces)
  failed = [r["file"] for r in report.failed]
  total = len(found) + len(missing)
  with_face = len(found) - len(no_face) - (len(failed) - len(missing))
  plural = "" if len(faces) == 1 else "s"
  print(f"align: {len(faces)} face{plural} from {with_face} of {total} inputs written to "
        f"{out_dir}"
        + (f"; no face in {len(no_face)}: {', '.join(no_face)}" if no_face else "")
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
  return {"inputs": total, "faces": len(faces), "no_face": no_face, "failed": failed}
