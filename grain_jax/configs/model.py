"""The model configs `1024` and `small` ({'model': ...}; for convert and bench); what each
holds is in grain_jax/nets/model_config.py."""
import ml_collections

from grain_jax.nets.model_config import MODELS


def get_config(name: str = "1024") -> ml_collections.ConfigDict:
  """{'model': ...} for a config file loader (`--config NAME` with NAME 1024 or small)."""
  if name not in MODELS:
    raise ValueError(f"unknown model config {name!r}; choose from {', '.join(MODELS)}")
  return ml_collections.ConfigDict(dict(model=MODELS[name]()))
