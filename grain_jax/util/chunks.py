"""Running a per-example function over a large batch a few examples at a time, to bound the
memory of inference at full resolution (model.inference_chunk)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def in_chunks(fn: Callable, chunk: int, shards: int = 1) -> Callable:
  """`fn(x)` for a batch x whose examples do not interact, run as a `lax.map` over chunks of
  `chunk` examples per shard; chunk <= 0 (or a batch that small) runs fn on the whole batch.

  The batch axis is split over `shards` devices (the data axis of jit's input sharding):
  every chunk takes `chunk` examples from each shard, so no example moves between devices.
  A batch that is not a multiple of shards * chunk is padded with zeros for the map, and the
  padding is dropped from the outputs. Memory then holds one chunk's temporaries instead of
  the batch's; the outputs equal fn(x)'s.
  """
  def run(x):
    n = x.shape[0]
    if chunk <= 0 or n <= chunk * shards:
      return fn(x)
    if n % shards:
      raise ValueError(f"in_chunks: a batch of {n} does not split over {shards} shards")
    per_shard = n // shards
    steps = -(-per_shard // chunk)
    rest = x.shape[1:]
    x = x.reshape(shards, per_shard, *rest)
    if steps * chunk != per_shard:
      x = jnp.pad(x, [(0, 0), (0, steps * chunk - per_shard)] + [(0, 0)] * len(rest))
    # (shards, steps, chunk) -> (steps, shards * chunk): step k runs chunk examples of each
    # shard. (lax.map's own batch_size would take consecutive examples: one shard's only.)
    xs = x.reshape(shards, steps, chunk, *rest).swapaxes(0, 1).reshape(
        steps, shards * chunk, *rest)
    ys = jax.lax.map(fn, xs)

    def back(y):
      y = y.reshape(steps, shards, chunk, *y.shape[2:]).swapaxes(0, 1)
      y = y.reshape(shards, steps * chunk, *y.shape[3:])[:, :per_shard]
      return y.reshape(n, *y.shape[2:])
    return jax.tree_util.tree_map(back, ys)
  return run
