"""GRAIN's four training stages, each with what it trains and its recipe (coaches/coachTrain.py).

The one table of stages: the training configs take their defaults from it, the train step its
structure, the demo and the benchmark its names and order.
"""
from __future__ import annotations

import dataclasses

from grain_jax.nets.registry import OUTPUT_NETWORKS


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  trains: tuple[str, ...]    # networks updated by the optimizer
  output: str                # the image the losses judge: hr_inv, hr_gan or hr
  discriminator: str         # the network judging it: patch_discriminator or discriminator
  # The batch side the discriminator step rescales into its fake images: the original feeds
  # the source x in stages 1-2 and the target y in stages 3-4 (the generator step always x;
  # GRAIN's data has x == y, where the two agree).
  d_fake_from: str
  d_every: int               # discriminator update every N steps
  lr_l2: float               # weight of the LR-image loss
  learning_rate: float

  @property
  def runs(self) -> tuple[str, ...]:
    """The networks the forward pass needs: those of its output."""
    return OUTPUT_NETWORKS[self.output]


STAGES = {s.name: s for s in (
    Stage("invrrdb", ("rescaler",), "hr_inv", "patch_discriminator",
          d_fake_from="x", d_every=6, lr_l2=0.1, learning_rate=1e-4),
    Stage("fea2code", ("fea2code",), "hr_gan", "discriminator",
          d_fake_from="x", d_every=5, lr_l2=0.0, learning_rate=1e-4),
    Stage("fusion", ("fusion",), "hr", "discriminator",
          d_fake_from="y", d_every=3, lr_l2=0.0, learning_rate=1e-4),
    Stage("finetune", ("rescaler", "fea2code", "fusion"), "hr", "discriminator",
          d_fake_from="y", d_every=3, lr_l2=0.1, learning_rate=5e-5),
)}
NAMES = tuple(STAGES)  # in training order


def get(name: str) -> Stage:
  """The stage called `name`; a ValueError lists the stages otherwise."""
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; choose from {', '.join(NAMES)}")
  return STAGES[name]
