"""Cloud TPU topologies as compile-only devices, on any host with libtpu (`pip install
"grain-jax[tpu]"`): what `grain-jax bench --topology` compiles for.

`jax.experimental.topologies.get_topology_desc` gives the devices of a slice (e.g. "v5e:2x2",
4 chips) without TPUs; a program lowered with shardings over a mesh of them compiles with the
real TPU compiler, which plans each chip's HBM (MaxText's and AXLearn's CI check their TPU
configs this way).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re

import jax
from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, as its JAX device (one per chip: megacore on v4 and v5p)."""
  device_kind: str        # jax Device.device_kind
  hbm_gib: float          # HBM per device as the TPU compiler budgets it (its OOM message)
  bf16_tflops: float      # peak bfloat16 TFLOP/s per chip (Google's published figure)
  chip_config: str = ""   # get_topology_desc's chip_config_name ("" = libtpu's default)


# hbm_gib: "exceeds available HBM (X G)" from libtpu 0.0.42 for each (a little less than the
# chips' 16 / 32 / 32 / 95 GiB); bf16_tflops: cloud.google.com/tpu/docs (v5e 197, v6e 918,
# v4 275, v5p 459).
CHIPS = {
    "v5e": Chip("TPU v5 lite", 15.75, 197.0),
    "v6e": Chip("TPU v6 lite", 31.25, 918.0),
    "v4": Chip("TPU v4", 30.75, 275.0, chip_config="megacore"),
    "v5p": Chip("TPU v5", 95.74, 459.0),
}

# libtpu looks for the TPU VM it runs on (metadata server, worker hostnames) when it loads,
# and prints warnings when there is none; a compile-only client needs neither. Set for
# this process and the compiler processes it starts, unless set already; ALLOW_MULTIPLE_
# LIBTPU_LOAD lets several compiler processes load libtpu at once.
QUIET_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
             "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
             "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str               # e.g. "v5e:2x2"
  generation: str         # a CHIPS key
  chips: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def parse(name: str) -> Topology:
  """The topology `name` ("GEN:AxB" or "GEN:AxBxC", GEN in CHIPS); ValueError otherwise."""
  m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", name.strip())
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"--topology {name!r}: expected GENERATION:AxB or AxBxC with a "
                     f"generation of {', '.join(CHIPS)} (e.g. v5e:2x2, v4:2x2x1)")
  return Topology(name.strip(), m.group(1), math.prod(int(v) for v in m.group(2).split("x")))


def quiet_libtpu() -> None:
  """QUIET_ENV for this process (before libtpu loads) and the processes it starts."""
  for k, v in QUIET_ENV.items():
    os.environ.setdefault(k, v)


def has_tpu() -> bool:
  """Whether this host has TPU chips (the device files libtpu opens: /dev/accel* on v2-v4,
  /dev/vfio on v5e, v5p, v6e)."""
  return bool(glob.glob("/dev/accel*")) or os.path.isdir("/dev/vfio")


def quiet_libtpu_off_tpu() -> None:
  """On a host without TPUs but with libtpu installed, JAX's TPU backend fails to start with
  five lines of warnings on stderr before JAX goes on with the CPU (or GPU): QUIET_ENV makes
  it fail silently. Nothing changes on a TPU host."""
  if not has_tpu():
    quiet_libtpu()


def devices(topology: Topology) -> list:
  """The compile-only devices of `topology`, one per chip."""
  quiet_libtpu()
  kw = {"chip_config_name": topology.chip.chip_config} if topology.chip.chip_config else {}
  desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu", **kw)
  found = list(desc.devices)
  if len(found) != topology.chips or found[0].device_kind != topology.chip.device_kind:
    raise ValueError(f"{topology.name}: libtpu gives {len(found)} x {found[0].device_kind}, "
                     f"expected {topology.chips} x {topology.chip.device_kind}")
  return found


def mesh(topology: Topology) -> jax.sharding.Mesh:
  """A ("data",) mesh over the topology's chips: the training step's data parallelism."""
  return jax.sharding.Mesh(devices(topology), ("data",))
