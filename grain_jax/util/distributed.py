"""Several processes (hosts) in one job: launch, the shared workdir, host copies of arrays.

JAX's distributed runtime is the engine: `initialize` connects the processes (explicit
coordinator address, process count and id, or auto-detection on TPU pods, SLURM, Open MPI and
Kubernetes); every process then sees the devices of all, jitted steps run over a mesh of all
of them, and Orbax saves and restores from all processes. A process that dies stops sending
heartbeats and the runtime ends the others (after `heartbeat_timeout_s`), so a job never
waits forever on a lost host.
"""
from __future__ import annotations

import logging
import os
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("grain_jax.distributed")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 100) -> None:
  """jax.distributed.initialize with our defaults. Without arguments JAX detects the cluster
  (TPU pod slice, SLURM, Open MPI, Kubernetes). On CPU the collectives go through gloo, so
  several processes on one machine (or CPU hosts) work."""
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given) and not all(v is not None for v in given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                     "(or give none of them to let JAX detect the cluster)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id {process_id} is not in 0..{num_processes - 1}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  if jax.process_index() != 0:  # one voice: the first process reports progress
    logging.getLogger("grain_jax").setLevel(logging.WARNING)


def multiprocess() -> bool:
  return jax.process_count() > 1


def host_copy(tree):
  """Numpy copies of a tree of jax Arrays replicated over the devices of all processes (each
  process holds a full replica; np.asarray of a global array may not read it)."""
  def one(a):
    if isinstance(a, jax.Array):
      if not a.is_fully_addressable:
        a = a.addressable_data(0)
      return np.asarray(a)
    return np.asarray(a)
  return jax.tree_util.tree_map(one, tree)


def agree(ok: bool, what: str) -> None:
  """Raises on every process if `ok` is False on any (a check that fails on one host only
  would otherwise leave the others waiting in the next collective)."""
  if not multiprocess():
    if not ok:
      raise RuntimeError(what)
    return
  all_ok = multihost_utils.process_allgather(np.array(bool(ok)))
  bad = [i for i, v in enumerate(np.asarray(all_ok).reshape(-1)) if not v]
  if bad:
    raise RuntimeError(f"{what} (on process {', '.join(map(str, bad))})")


def check_shared_folder(directory: str) -> None:
  """A multi-process job's workdir must be one folder all hosts see: process 0 writes a
  marker there that every process must then read back."""
  if not multiprocess():
    return
  token = broadcast_from_first(np.frombuffer(uuid.uuid4().bytes, np.uint8))
  name = os.path.join(directory, f".shared-check-{bytes(token).hex()}")
  if jax.process_index() == 0:
    with open(name, "w") as f:
      f.write("written by process 0\n")
  multihost_utils.sync_global_devices("grain_jax: shared folder marker written")
  seen = os.path.exists(name)
  multihost_utils.sync_global_devices("grain_jax: shared folder marker read")
  if jax.process_index() == 0:
    os.remove(name)
  agree(seen, f"{directory} is not one folder shared by all hosts: a file process 0 wrote "
              f"there is not visible; put --workdir on a filesystem every host mounts")


def broadcast_from_first(x: np.ndarray) -> np.ndarray:
  """Process 0's value of a host array, on every process."""
  if not multiprocess():
    return x
  return np.asarray(multihost_utils.broadcast_one_to_all(x))
