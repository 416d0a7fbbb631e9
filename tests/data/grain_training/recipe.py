"""The fixed inputs of the training references, shared by make_reference.py (which feeds them
to the original) and tests/test_training_parity.py (which feeds them to grain_jax): the
batches, the random draws of every forward pass and the probe vectors of the parameter
summaries. numpy and Pillow only."""
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("invrrdb", "fea2code", "fusion", "finetune")
D_EVERY = {"invrrdb": 6, "fea2code": 5, "fusion": 3, "finetune": 3}  # coachTrain's d_iter
R1_EVERY = 16
# scikit-image's pictures, centre square, bicubic to 256 px (images/, make_reference.py images).
IMAGES = ("astronaut", "chelsea", "coffee", "immunohistochemistry")
NOISE_SEED = 5001
PROBE_SEED = 5002


def noise_array(stage: str, step: int, pass_: int, slot: int, shape) -> np.ndarray:
  """A random draw of the loop, fixed. Slot 0: the quantizer's U(-0.5, 0.5) (N, 3, lr, lr);
  slot 1 + l: generator layer l's N(0, 1) map (N, 1, R, R). `pass_` numbers the forward
  passes of a step: 0 the discriminator step's when there is one, then the generator
  step's. float32, NCHW as the original draws them."""
  rng = np.random.default_rng([NOISE_SEED, STAGES.index(stage), step, pass_, slot])
  if slot == 0:
    return rng.uniform(-0.5, 0.5, shape).astype(np.float32)
  return rng.standard_normal(shape).astype(np.float32)


def images(size: int) -> list:
  """The training images (size, size, 3) float32 in [-1, 1] (bicubic from 256 px when size
  differs), converted as torchvision's ToTensor + Normalize(0.5, 0.5) would."""
  from PIL import Image
  out = []
  for name in IMAGES:
    im = Image.open(os.path.join(HERE, "images", f"{name}.png")).convert("RGB")
    if im.size != (size, size):
      im = im.resize((size, size), Image.BICUBIC)
    u8 = np.asarray(im)
    out.append((u8.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
  return out


def batch(step: int, batch_size: int, size: int) -> tuple:
  """Step `step`'s (x, y), NHWC: the targets y cycle through the images and the source x is
  y mirrored left-right, so a pass that takes the wrong one shows."""
  imgs = images(size)
  y = np.stack([imgs[(step * batch_size + j) % len(imgs)] for j in range(batch_size)])
  return np.ascontiguousarray(y[:, :, ::-1]), y


def passes(stage: str, step: int) -> dict:
  """{'d': pass index of the discriminator step's forward (None without one), 'g': ...}."""
  d = step % D_EVERY[stage] == 0
  return {"d": 0 if d else None, "g": 1 if d else 0}


def probe(shape, index: int) -> np.ndarray:
  """The fixed direction on which a parameter tensor's change is projected (tensor `index`
  of its network's state dict)."""
  return np.random.default_rng([PROBE_SEED, index]).standard_normal(shape)
