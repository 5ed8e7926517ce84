"""What the planner compiles for: Cloud TPU accelerator types, or N GPUs of a given HBM.

    target = tpu_target("v5p-8")          # 4 chips (2x2x1), 95 GiB each, compile-only devices
    target = gpu_target(8, hbm_gb=80)     # 8 fake CPU devices standing in for 8 GPUs

A TPU accelerator type counts TensorCores for v4 / v5p (`v5p-8` = 4 chips of 2 cores run as
one megacore device each) and chips for v5e / v6e (`v5litepod-8`, `v6e-8` = 8 chips). The
devices come from libtpu's compile-only topology (`jax.experimental.topologies`), so
`jit(...).lower(...).compile()` gives the real TPU program's memory and cost analysis on a
machine without a TPU. Per-device figures are the public Cloud TPU specifications: HBM, dense
bf16 peak FLOP/s, HBM bandwidth.

v4's compile-only topology exposes each TensorCore as a device (not the megacore default of a
v4 VM): a v4 target plans 2 devices per chip, each with half the chip's HBM and FLOP/s.

GPUs: no deviceless GPU compiler exists on a CPU machine, so a GPU target compiles for N fake
CPU devices with the same mesh (an estimate; see plan/report.py for how far it may be off).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
from jax.experimental import topologies

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-device figures of a TPU generation (a device = what JAX calls one)."""

    topology: str          # libtpu's name prefix ("v5p", "v5e", …)
    hbm_bytes: int
    peak_flops: float      # dense bf16 FLOP/s
    hbm_bandwidth: float   # bytes/s
    cores_per_chip: int    # TensorCores an accelerator-type count counts per chip
    chips_per_host: int    # of a multi-host slice
    max_single_host: int   # the largest slice on one host, in chips
    three_d: bool          # 3-D torus (x, y, z) or 2-D


# Cloud TPU specifications (cloud.google.com/tpu/docs/<generation>), per chip; v4 per core.
CHIPS = {
    "v4": Chip("v4", 16 * GiB, 275e12 / 2, 1228e9 / 2, 2, 4, 4, True),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 2, 4, 4, True),
    "v5litepod": Chip("v5e", 16 * GiB, 197e12, 819e9, 1, 4, 8, False),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 1, 4, 8, False),
}
CHIPS["v5e"] = CHIPS["v5litepod"]

# 2-D slices of v5e / v6e (chips -> x, y) and 3-D slices of v4 / v5p (chips -> x, y, z).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A planning target: its devices' figures, and how to get compile devices for it."""

    name: str              # "v5p-8", "8x H100/H200 (80 GiB)"
    platform: str          # "tpu" | "gpu"
    num_devices: int
    hosts: int
    hbm_bytes: int         # per device
    peak_flops: float      # per device, dense bf16
    hbm_bandwidth: float   # per device, bytes/s
    topology: str | None = None      # libtpu topology name, TPU only
    chips_per_host: tuple[int, int, int] | None = None

    @property
    def estimate(self) -> bool:
        """True where the figures come from a stand-in compile (GPU on CPU devices)."""
        return self.platform != "tpu"

    def devices(self) -> list:
        """Compile devices: libtpu's compile-only TPU devices, or the CPU devices (the caller
        has set `jax_num_cpu_devices` to num_devices before the backend started)."""
        if self.platform == "tpu":
            # No TPU here: libtpu only compiles, so other planner processes may load it too.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            try:
                topo = topologies.get_topology_desc(
                    platform="tpu", topology_name=self.topology,
                    chips_per_host_bounds=list(self.chips_per_host))
            except Exception as e:  # libtpu missing or too old: say what to install
                raise TargetError(f"cannot build the {self.name} topology ({self.topology}): "
                                  f"{e}. The planner needs libtpu: pip install -e '.[tpu]'")
            return list(topo.devices)
        devices = jax.devices("cpu")
        if len(devices) < self.num_devices:
            raise TargetError(f"{self.num_devices} CPU devices needed for the GPU estimate, "
                              f"{len(devices)} available (the backend started too early)")
        return devices[:self.num_devices]


class TargetError(ValueError):
    """A target name or size the planner cannot plan for (bad input)."""


def tpu_target(name: str) -> Target:
    """A Cloud TPU accelerator type: v4-N, v5p-N (N TensorCores), v5litepod-N / v6e-N (chips)."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise TargetError(f"unknown TPU type {name!r}; use a Cloud TPU accelerator type: "
                          f"v4-8, v5p-8 … v5p-512, v5litepod-1/4/8/16 …, v6e-1/4/8/16 …")
    chip = CHIPS[m.group(1)]
    count = int(m.group(2))
    if count % chip.cores_per_chip:
        raise TargetError(f"{name}: {m.group(1)} counts {chip.cores_per_chip} cores per chip")
    chips = count // chip.cores_per_chip
    shapes = SHAPES_3D if chip.three_d else SHAPES_2D
    if chips not in shapes:
        raise TargetError(f"{name}: no {chips}-chip {m.group(1)} slice; known sizes: "
                          + ", ".join(f"{m.group(1)}-{c * chip.cores_per_chip}"
                                      for c in shapes))
    shape = shapes[chips]
    if chips <= chip.max_single_host:
        per_host = shape + (1,) * (3 - len(shape))
    else:
        per_host = (2, 2, 1)
    hosts = max(1, chips // (per_host[0] * per_host[1] * per_host[2]))
    devices = chips * (2 if chip.topology == "v4" else 1)
    return Target(name=name, platform="tpu", num_devices=devices, hosts=hosts,
                  hbm_bytes=chip.hbm_bytes, peak_flops=chip.peak_flops,
                  hbm_bandwidth=chip.hbm_bandwidth,
                  topology=f"{chip.topology}:{'x'.join(map(str, shape))}",
                  chips_per_host=per_host)


# H100 / H200 SXM dense bf16 and HBM bandwidth; other GPUs: pass --peak_tflops / --hbm_tbps.
GPU_PEAK_FLOPS = 989e12
# By memory size (GiB as nvidia-smi reports them): H100 80, H100 NVL 94, H200 139-141.
GPU_BANDWIDTH = {80: 3.35e12, 94: 3.9e12, 139: 4.8e12, 140: 4.8e12, 141: 4.8e12}


def gpu_target(count: int, hbm_gb: float, *, peak_flops: float | None = None,
               bandwidth: float | None = None) -> Target:
    """N GPUs with `hbm_gb` GiB each (H100 80, H100 NVL 94, H200 141 by default figures)."""
    if count < 1 or hbm_gb <= 0:
        raise TargetError(f"--gpus must be >= 1 and --hbm_gb > 0, got {count}, {hbm_gb}")
    bw = bandwidth or GPU_BANDWIDTH.get(round(hbm_gb), GPU_BANDWIDTH[80])
    return Target(name=f"{count}x GPU ({hbm_gb:g} GiB)", platform="gpu", num_devices=count,
                  hosts=1, hbm_bytes=int(hbm_gb * GiB), peak_flops=peak_flops or GPU_PEAK_FLOPS,
                  hbm_bandwidth=bw)
