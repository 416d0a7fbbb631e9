"""Image decoding, resizing, input discovery, background reading, TFDS sources, and the
PSNR/SSIM code against scikit-image on the same arrays."""
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.metrics
from PIL import Image

from conftest import write_png16
from grain_jax.data import sources
from grain_jax.eval import metrics
from grain_jax.formats import images
from grain_jax.util import prefetch


def _skimage_ssim(a, b):
  return skimage.metrics.structural_similarity(
      a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False)


@pytest.mark.parametrize("shape", [(11, 11), (64, 48), (200, 180)])
def test_psnr_ssim_match_skimage(shape):
  rng = np.random.default_rng(sum(shape))
  a = skimage.data.astronaut()[:shape[0], :shape[1]].astype(np.float64)
  noisy = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).round()
  other = rng.integers(0, 256, a.shape).astype(np.float64)
  batch_a, batch_b = np.stack([a, a]), np.stack([noisy, other])
  got_psnr = np.asarray(metrics.psnr(batch_a, batch_b))
  got_ssim = np.asarray(metrics.ssim(batch_a, batch_b))
  for i, b in enumerate((noisy, other)):
    want = skimage.metrics.peak_signal_noise_ratio(a, b, data_range=255)
    assert abs(got_psnr[i] - want) < 1e-4, (i, got_psnr[i], want)
    assert abs(got_ssim[i] - _skimage_ssim(a, b)) < 2e-5, (i, got_ssim[i], _skimage_ssim(a, b))


def test_psnr_of_identical_images_is_capped():
  a = np.full((1, 8, 8, 3), 7.0)
  assert float(metrics.psnr(a, a)[0]) == metrics.PSNR_MAX


def test_ssim_refuses_images_smaller_than_its_window():
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_png_levels_in_a_jitted_step_match_the_saved_png():
  """Evaluation judges the 8-bit levels it computes on the device (images.png_levels of a
  JAX array); they must be the levels images.to_uint8 writes, half-levels included."""
  x = np.linspace(-1.2, 1.2, 3 * 7 * 5 * 3).reshape(3, 7, 5, 3).astype(np.float32)
  x[0, 0, :5, 0] = (np.arange(5) + 0.5) / 127.5 - 1.0  # exactly between two levels
  levels = jax.jit(images.png_levels)(jnp.asarray(x))
  assert isinstance(levels, jax.Array)
  np.testing.assert_array_equal(np.asarray(levels), images.to_uint8(x))


def _read(tmp_path, name, writer):
  path = str(tmp_path / name)
  writer(path)
  return images.read_image(path)


def test_decode_converts_every_common_mode(tmp_path):
  rgb = skimage.data.astronaut()[:32, :32]
  got, note = _read(tmp_path, "rgb.png", lambda p: Image.fromarray(rgb).save(p))
  assert note is None and got.dtype == np.float32 and got.shape == (32, 32, 3)
  np.testing.assert_array_equal(np.round(got * 255), rgb)

  gray = rgb[..., 0]
  got, note = _read(tmp_path, "gray.png", lambda p: Image.fromarray(gray).save(p))
  assert "L -> RGB" in note
  np.testing.assert_array_equal(np.round(got * 255), np.repeat(gray[..., None], 3, -1))

  rgba = np.concatenate([rgb, np.zeros_like(rgb[..., :1])], -1)
  rgba[:16, ..., 3] = 255  # top half opaque, bottom half transparent
  got, note = _read(tmp_path, "rgba.png", lambda p: Image.fromarray(rgba).save(p))
  assert "white" in note
  np.testing.assert_array_equal(np.round(got[:16] * 255), rgb[:16])
  np.testing.assert_array_equal(got[16:], 1.0)

  pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
  got, _ = _read(tmp_path, "pal.png", pal.save)
  np.testing.assert_array_equal(np.round(got * 255), np.asarray(pal.convert("RGB")))

  g16 = (np.arange(32 * 32).reshape(32, 32) * 64 + 3).astype(np.uint16)
  got, note = _read(tmp_path, "g16.png", lambda p: write_png16(p, g16))
  assert "16-bit" in note
  np.testing.assert_allclose(got[..., 1], g16 / 65535.0, atol=1e-7)  # no 8-bit loss

  rgb16 = rgb.astype(np.uint16) * 257
  got, _ = _read(tmp_path, "rgb16.png", lambda p: write_png16(p, rgb16))
  np.testing.assert_array_equal(np.round(got * 255), rgb)

  got, note = _read(tmp_path, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK").save)
  assert "CMYK -> RGB" in note and got.shape == (32, 32, 3)


@pytest.mark.parametrize("content", [b"", b"not an image", None])
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path, content):
  path = tmp_path / "bad.png"
  if content is None:  # a truncated PNG
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "PNG")
    content = buf.getvalue()[:2000]
  path.write_bytes(content)
  with pytest.raises(images.ImageError, match="bad.png"):
    images.read_image(str(path))


def test_resize_square_center_crops_then_resizes():
  img = np.random.default_rng(0).random((40, 60, 3), dtype=np.float32)
  same = images.resize_square(img[:, 10:50], 40)
  np.testing.assert_array_equal(same, img[:, 10:50])  # square of the right size: unchanged
  np.testing.assert_array_equal(images.resize_square(img, 40), img[:, 10:50])  # crop only
  small = images.resize_square(img, 20)
  assert small.shape == (20, 20, 3) and small.dtype == np.float32
  # A 2x antialiased reduction of the crop is close to its 2x2 box average.
  box = img[:, 10:50].reshape(20, 2, 20, 2, 3).mean((1, 3))
  assert np.abs(small - box).mean() < 0.1
  big = images.resize_square(img, 80)
  assert big.shape == (80, 80, 3) and 0 <= big.min() and big.max() <= 1


def test_find_images_recurses_sorted_and_names_collisions(tmp_path):
  for rel in ("b.png", "a.jpg", "sub/c.png", "sub/notes.txt", ".hidden.png"):
    (tmp_path / rel).parent.mkdir(exist_ok=True)
    (tmp_path / rel).write_bytes(b"x")
  found = images.find_images([str(tmp_path)])
  assert [f.name for f in found] == ["a.jpg", "b.png", os.path.join("sub", "c.png")]
  assert images.output_names(found) == ["a.png", "b.png", os.path.join("sub", "c.png")]
  (tmp_path / "b.jpg").write_bytes(b"x")
  with pytest.raises(ValueError, match="both be written as b.png"):
    images.output_names(images.find_images([str(tmp_path)]))
  with pytest.raises(FileNotFoundError, match="missing"):
    images.find_images([str(tmp_path / "missing")])


def test_prefetch_keeps_order_and_hands_over_errors():
  def fn(i):
    if i == 3:
      raise ValueError("bad three")
    return i * i
  got = list(prefetch.prefetch(fn, range(10), workers=3, depth=4))
  assert [g[0] for g in got] == list(range(10))
  assert [g[1] for g in got if g[0] != 3] == [i * i for i in range(10) if i != 3]
  assert isinstance(got[3][2], ValueError) and got[3][1] is None


def test_batches_skip_failures_and_pad_the_last():
  def fn(i):
    if i in (1, 4):
      raise ValueError(f"bad {i}")
    return np.full((2, 2), i, np.float32)
  failed = []
  groups = list(prefetch.batches(prefetch.prefetch(fn, range(7), workers=2), 2,
                             lambda i, e: failed.append((i, str(e)))))
  assert failed == [(1, "bad 1"), (4, "bad 4")]
  assert [[i for i, _ in g] for g in groups] == [[0, 2], [3, 5], [6]]
  x = prefetch.pad_batch([r for _, r in groups[-1]], 2)
  assert x.shape == (2, 2, 2) and x.dtype == np.float32
  assert (x[0] == 6).all() and (x[1] == 0).all()


def make_tfds_dataset(data_dir, pictures, names=None, corrupt=()):
  """Prepares a tiny TFDS dataset 'grain_test_faces' (split 'test') in ArrayRecord files.

  Images are stored as encoded PNG bytes, which TFDS accepts without TensorFlow. Indices in
  `corrupt` get bytes that are no image.
  """
  import tensorflow_datasets as tfds

  def png_bytes(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    buf.seek(0)
    return buf

  class GrainTestFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      feats = {"image": tfds.features.Image(shape=(None, None, 3))}
      if names:
        feats["image/filename"] = tfds.features.Text()
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, a in enumerate(pictures):
        ex = {"image": io.BytesIO(b"\x89PNG broken") if i in corrupt else png_bytes(a)}
        if names:
          ex["image/filename"] = names[i]
        yield i, ex

  GrainTestFaces(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return "grain_test_faces"


def test_tfds_source_reads_prepared_split(tmp_path):
  pics = [np.full((20, 30, 3), 10 * i, np.uint8) for i in range(3)]
  name = make_tfds_dataset(tmp_path, pics, names=["x/a.jpg", "b.png", "c.png"])
  src = sources.open_source(f"tfds:{name}/test", str(tmp_path))
  assert len(src) == 3 and src.description == f"tfds:{name}/test"
  # TFDS stores records in its own (hashed) order; the filename feature names them.
  by_name = {src.name(i): i for i in range(3)}
  assert sorted(by_name) == ["b.png", "c.png", "x_a.jpg"]
  img, note = src.load(by_name["c.png"])
  assert note is None and img.shape == (20, 30, 3)
  np.testing.assert_array_equal(np.round(img * 255), pics[2])
  assert len(sources.open_source(f"tfds:{name}/test[:2]", str(tmp_path))) == 2
  # A wrong name is named in one line (TFDS's list of every dataset left out), no download.
  with pytest.raises(FileNotFoundError, match="prepare it first") as e:
    sources.open_source("tfds:no_such_dataset_here/test", str(tmp_path))
  assert "Dataset no_such_dataset_here not found" in str(e.value)
  assert "\n" not in str(e.value) and len(str(e.value)) < 400
  with pytest.raises(ValueError, match="tfds:NAME/SPLIT"):
    sources.open_source("tfds:nosplit")
