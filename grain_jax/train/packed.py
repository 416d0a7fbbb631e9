"""Trained parameters (and so their optimizer moments) as one vector per dtype.

A stage trains up to ~1,000 parameter tensors, and Ranger keeps five copies of each (fast,
slow, two moments, the update). Written per tensor, the optimizer update and the divergence
guard are thousands of small kernels, and compilers spend their time on kernels: for a TPU
they were 45-61% of a training program's, and XLA:CPU took ~20 s to compile the update
alone for stage 4's 1,064 tensors against ~2 s for the same update on one vector.

So the train state holds a `PackedTree`: the tree's leaves raveled and concatenated, one
1-D buffer per dtype, with the tree's structure and shapes as static `Layout`. It is a
pytree whose leaves are those buffers, so optax transforms, `jnp.where` and the all-reduce
of the gradients run on a few long vectors. The networks see `unpack()`: slices and
reshapes, which XLA fuses into their consumers. Gradients are taken with respect to that
unpacked tree and packed (one concatenation), never through the slices (whose transpose is
a full-length pad per tensor).

Packing is a layout change: every element is computed by the same operations as before, so
a packed step equals the per-tensor one up to float rounding (XLA may fuse the slices into
the networks' first operations and round a sum differently). Checkpoints keep the
per-tensor layout on disk (`unpack_all` before saving, `pack_like` after restoring).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each leaf of a tree lies in its dtype's buffer (static: part of the treedef)."""
  treedef: Any
  shapes: tuple      # per leaf
  dtypes: tuple      # per leaf: dtype names, the keys of PackedTree.buffers
  offsets: tuple     # per leaf: start in its dtype's buffer
  sizes: tuple       # dtype name -> buffer length, as sorted (name, length) pairs

  @classmethod
  def of(cls, tree) -> "Layout":
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shapes = tuple(tuple(int(d) for d in np.shape(a)) for a in leaves)
    dtypes = tuple(jnp.dtype(a.dtype).name for a in leaves)
    offsets, ends = [], {}
    for shape, dtype in zip(shapes, dtypes):
      offsets.append(ends.get(dtype, 0))
      ends[dtype] = offsets[-1] + int(np.prod(shape, dtype=np.int64))
    return cls(treedef, shapes, dtypes, tuple(offsets), tuple(sorted(ends.items())))

  def __hash__(self):  # jit hashes treedefs on every call; the tuples are ~1,000 entries
    try:
      return self.__dict__["_hash"]
    except KeyError:
      h = hash((self.treedef, self.shapes, self.dtypes, self.offsets, self.sizes))
      object.__setattr__(self, "_hash", h)
      return h

  def pack(self, tree) -> "PackedTree":
    """`tree` (of this layout) as a PackedTree. Concrete host or device values are joined on
    the host (no compilation); traced ones with one concatenation per dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != self.treedef:
      raise ValueError(f"cannot pack a tree of structure {treedef} into layout {self.treedef}")
    traced = any(isinstance(a, jax.core.Tracer) for a in leaves)
    xp = jnp if traced else np
    buffers = {}
    for name, _ in self.sizes:
      parts = [xp.ravel(a) for a, d in zip(leaves, self.dtypes) if d == name]
      buffers[name] = xp.concatenate(parts) if len(parts) > 1 else parts[0]
    if not traced:
      buffers = {k: jnp.asarray(v) for k, v in buffers.items()}
    return PackedTree(buffers, self)


class PackedTree(flax.struct.PyTreeNode):
  """A tree as one 1-D buffer per dtype (`buffers`: dtype name -> array) and its `layout`."""
  buffers: dict
  layout: Layout = flax.struct.field(pytree_node=False)

  def unpack(self):
    """The tree: each leaf a slice of its buffer, reshaped."""
    return _unpack(self)


@jax.jit
def _unpack(packed: PackedTree):
  # Jitted so that unpacking a concrete state (validation, previews, exports) is one program
  # rather than one eager slice per leaf; inside a traced step it is inlined.
  lay = packed.layout
  leaves = [jax.lax.slice(packed.buffers[d], (o,), (o + int(np.prod(s, dtype=np.int64)),))
            .reshape(s) for s, d, o in zip(lay.shapes, lay.dtypes, lay.offsets)]
  return jax.tree_util.tree_unflatten(lay.treedef, leaves)


def is_packed(x) -> bool:
  return isinstance(x, PackedTree)


def pack(tree) -> PackedTree:
  """`tree` as a PackedTree of its own layout."""
  return Layout.of(tree).pack(tree)


def maybe_unpack(x):
  """x.unpack() for a PackedTree, else x."""
  return x.unpack() if is_packed(x) else x


def pack_as(like, tree):
  """`tree` packed as `like` is (a PackedTree, or a tree holding PackedTrees); unchanged where
  `like` is not packed."""
  return jax.tree_util.tree_map(lambda l, t: l.layout.pack(t) if is_packed(l) else t,
                                like, tree, is_leaf=is_packed)


@jax.jit
def unpack_all(tree):
  """`tree` with every PackedTree in it unpacked (what checkpoints store)."""
  return jax.tree_util.tree_map(maybe_unpack, tree, is_leaf=is_packed)


def pack_like(like, tree):
  """The inverse of unpack_all: `tree` (unpacked) packed where `like` (a tree of the same
  kind, concrete or abstract) holds PackedTrees. One jitted program."""
  skeleton = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
  return jax.jit(lambda t: pack_as(skeleton, t))(tree)
