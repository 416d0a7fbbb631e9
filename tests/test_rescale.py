"""`grain-jax down|up`: exact PNG round trip, conversions, bad inputs."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image

from conftest import ROOT, write_png16
from grain_jax import cli
from grain_jax.formats import images
from grain_jax.nets.quantizer import lr_to_uint8

SAMPLE = os.path.join(ROOT, "grain_jax", "samples", "astronaut_face.png")


def _png(path):
  return np.asarray(Image.open(path))


def _model_input(path, hr):
  return images.to_model(images.resize_square(images.read_image(path)[0], hr))[None]


def test_down_then_up_from_png_equals_in_memory_path(small_model, small_weights, tmp_path):
  lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
  assert cli.main(["down", "--checkpoint", small_weights, SAMPLE, "--out", str(lr_dir)]) == 0
  lr_png = lr_dir / "astronaut_face.png"
  x = _model_input(SAMPLE, small_model.hr_size)
  lr_mem = small_model.downscale(x)
  np.testing.assert_array_equal(_png(lr_png), lr_to_uint8(lr_mem)[0])
  assert _png(lr_png).shape == (small_model.lr_size,) * 2 + (3,)

  assert cli.main(["up", "--checkpoint", small_weights, str(lr_png), "--out", str(hr_dir),
                       "--save", "hr,hr_inv,hr_gan"]) == 0
  out_mem = small_model.upscale(lr_mem)
  for key, suffix in (("hr", ""), ("hr_inv", "_hr_inv"), ("hr_gan", "_hr_gan")):
    got = _png(hr_dir / f"astronaut_face{suffix}.png")
    np.testing.assert_array_equal(got, images.to_uint8(out_mem[key])[0], err_msg=key)


def test_converted_and_resized_inputs_give_lr_files(small_weights, tmp_path, capsys):
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  rgb = np.asarray(Image.open(SAMPLE))
  Image.fromarray(rgb[..., 0]).save(src / "gray.png")
  Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(src / "a.png")
  write_png16(src / "sub" / "deep.png", rgb.astype(np.uint16) * 257)
  Image.fromarray(rgb[:100]).save(src / "wide.jpg")
  out = tmp_path / "lr"
  assert cli.main(["down", "--checkpoint", small_weights, str(src), "--out", str(out),
                       "--batch_size", "3"]) == 0
  err = capsys.readouterr().err
  for name in ("gray.png", "a.png", "sub/deep.png", "wide.png"):
    assert _png(out / name).shape == (4, 4, 3), name
  assert "L -> RGB" in err and "RGBA -> RGB" in err and "center-cropped" in err
  assert err.count("center-cropped") == 1  # the resize warning comes once
  # 16-bit input of the same picture gives the same LR as the 8-bit one.
  assert cli.main(["down", "--checkpoint", small_weights, SAMPLE, "--out", str(out)]) == 0
  np.testing.assert_array_equal(_png(out / "sub" / "deep.png"), _png(out / "astronaut_face.png"))


def test_bad_files_are_skipped_by_name_and_the_rest_processed(small_weights, tmp_path, capsys):
  src = tmp_path / "in"
  src.mkdir()
  Image.open(SAMPLE).save(src / "good.png")
  (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (src / "empty.jpg").write_bytes(b"")
  lr_dir = tmp_path / "lr"
  rc = cli.main(["down", "--checkpoint", small_weights, str(src), str(tmp_path / "nope.png"),
                     "--out", str(lr_dir)])
  err = capsys.readouterr().err
  assert rc == 1
  assert sorted(os.listdir(lr_dir)) == ["good.png"]
  for bad in ("corrupt.png", "empty.jpg", "nope.png"):
    assert f"skipped {bad}" in err or "nope.png: no such file" in err, bad
  assert "3 failed" in err

  # up: a wrong-size PNG (an HR picture) and a corrupt file are refused, the good LR is used.
  Image.open(SAMPLE).save(lr_dir / "big.png")
  (lr_dir / "corrupt.png").write_bytes(b"nothing")
  rc = cli.main(["up", "--checkpoint", small_weights, str(lr_dir), "--out",
                     str(tmp_path / "hr")])
  err = capsys.readouterr().err
  assert rc == 1
  assert os.listdir(tmp_path / "hr") == ["good.png"]
  assert "big.png: 256x256 is not an LR image of this checkpoint (4x4)" in err
  assert "skipped corrupt.png" in err


def test_refuses_bad_checkpoint_collisions_and_overwriting_inputs(small_weights, tmp_path,
                                                                  capsys):
  assert cli.main(["down", "--checkpoint", str(tmp_path), SAMPLE, "--out",
                       str(tmp_path / "o")]) == 2
  assert "not a grain_jax weights directory" in capsys.readouterr().err

  lr_dir = tmp_path / "lr"
  assert cli.main(["down", "--checkpoint", small_weights, SAMPLE, "--out", str(lr_dir)]) == 0
  before = (lr_dir / "astronaut_face.png").read_bytes()
  assert cli.main(["up", "--checkpoint", small_weights, str(lr_dir), "--out",
                       str(lr_dir)]) == 2
  assert "would overwrite the input" in capsys.readouterr().err
  assert (lr_dir / "astronaut_face.png").read_bytes() == before

  (tmp_path / "twins").mkdir()
  Image.open(SAMPLE).save(tmp_path / "twins" / "a.png")
  Image.open(SAMPLE).save(tmp_path / "twins" / "a.jpg")
  assert cli.main(["down", "--checkpoint", small_weights, str(tmp_path / "twins"), "--out",
                       str(tmp_path / "o")]) == 2
  assert "would both be written as a.png" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()

  assert cli.main(["up", "--checkpoint", small_weights, SAMPLE, "--out", "x", "--save",
                   "hr,foo"]) == 2
  assert "--save: unknown output(s) ['foo']" in capsys.readouterr().err


def test_help_explains_both_commands():
  for sub in ("down", "up"):
    res = subprocess.run([sys.executable, "-m", "grain_jax", sub, "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0
    assert "down --checkpoint CKPT INPUT" in res.stdout and "center-cropped" in res.stdout


def test_inference_chunk_gives_the_same_outputs(small_model, small_weights):
  """model.inference_chunk: down/upscale run 2 images at a time (a batch of 5: the last
  chunk padded) and return what the whole batch gives."""
  import grain_jax
  chunked = grain_jax.load(small_weights, inference_chunk=2)
  rng = np.random.default_rng(0)
  hr = rng.uniform(-1, 1, (5, small_model.hr_size, small_model.hr_size, 3)).astype(np.float32)
  lr = small_model.downscale(hr)
  np.testing.assert_array_equal(np.asarray(chunked.downscale(hr)), np.asarray(lr))
  want, got = small_model.upscale(lr), chunked.upscale(lr)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=0, atol=1e-5,
                               err_msg=k)


def test_chunks_keep_each_example_on_its_shard_and_in_order():
  """util.chunks.in_chunks over a batch of 10 split in 2 shards (0-4, 5-9), 2 per shard at a
  time: each map step takes 2 examples from each shard, so none moves between devices; the
  outputs come back in the input's order, the padding of the last step dropped."""
  from grain_jax.util.chunks import in_chunks
  x = np.arange(1, 11, dtype=np.float32)[:, None]  # 1..10, so padding (0) shows

  def fn(c):  # each example also returns the examples it ran with
    return {"y": c * 2, "mates": jnp.broadcast_to(c[:, 0], (c.shape[0], c.shape[0]))}
  out = in_chunks(fn, chunk=2, shards=2)(x)
  np.testing.assert_array_equal(out["y"], x * 2)
  mates = {int(x[i, 0]): sorted(out["mates"][i].tolist()) for i in range(10)}
  assert mates[1] == mates[2] == mates[6] == mates[7] == [1, 2, 6, 7]
  assert mates[3] == mates[9] == [3, 4, 8, 9]
  assert mates[5] == mates[10] == [0, 0, 5, 10]
  assert in_chunks(fn, chunk=0, shards=2)(x)["mates"].shape == (10, 10)  # 0: the whole batch
