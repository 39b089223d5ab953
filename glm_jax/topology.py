"""TPU topologies described without a TPU: devices to compile for ahead of time (libtpu).

    devices = topology_devices("v5p-1536")            # 768 TPU v5 devices (megacore chips)
    devices = topology_devices("v5e-16", slices=2)    # two slices over the data-center network
    mesh = sharding.make_mesh("24x8x4", devices)      # then jit(...).lower(abstract).compile()

Names are Cloud TPU's: v4 and v5p count TensorCores (two per chip, one megacore device each),
v5e and v6e count chips. `v5p:8x8x12` names the physical chip grid directly. The compile needs
libtpu (`pip install 'jax[tpu]'`, the test extra); JAX_PLATFORMS can stay "cpu".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


class TopologyError(ValueError):
    """An unknown or malformed topology name, or no libtpu to describe it; says what to do."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. hbm_gib, peak_tflops (dense bf16) and hbm_gb_per_s are Google's
    published per-chip figures (`source`); the compiler reports its own usable HBM when a plan
    does not fit."""

    name: str
    device_kind: str  # what libtpu's devices report
    hbm_gib: float
    peak_tflops: float
    cores_per_chip_in_name: int  # v4-8 is 4 chips: the name counts TensorCores
    chip_config: str  # libtpu's chip_config_name: megacore = one device per chip
    dims: int  # physical torus dimensions
    source: str
    hbm_gb_per_s: float  # HBM bandwidth, 1e9 bytes/s: what a memory-bound decode step is divided by
    bandwidth_source: str  # the page and its words
    ici_links: int  # ICI ports per chip: 6 on a 3D torus, 4 on a 2D one
    ici_gb_per_s: float  # one link, one direction, 1e9 bytes/s (ICI_SOURCES)


# HBM bandwidth as the Cloud TPU pages print it (search of the stored pages, 2026-12-07): v4 "HBM2
# capacity and bandwidth 32 GiB, 1200 GBps"; v5e "16 GB, 819 GBps" (819.2 = 2 stacks x 1024 bits x
# 3.2 Gb/s; a later revision of the page writes "800 GiBps", 859 GB/s); v5p "95 GB, 2765 GBps" (the
# later revision: "2575 GiBps", the same bytes); v6e "HBM bandwidth per chip 1638 GBps" (often
# rounded to 1640).
CHIPS = {
    "v4": Chip(
        "v4",
        "TPU v4",
        32.0,
        275.0,
        2,
        "megacore",
        3,
        "https://cloud.google.com/tpu/docs/v4",
        1200.0,
        "https://cloud.google.com/tpu/docs/v4: HBM2 capacity and bandwidth 32 GiB, 1200 GBps",
        6,
        50.0,
    ),
    "v5e": Chip(
        "v5e",
        "TPU v5 lite",
        16.0,
        197.0,
        1,
        "default",
        2,
        "https://cloud.google.com/tpu/docs/v5e",
        819.0,
        "https://cloud.google.com/tpu/docs/v5e: HBM2 capacity and bandwidth 16 GB, 819 GBps",
        4,
        50.0,
    ),
    "v5p": Chip(
        "v5p",
        "TPU v5",
        95.0,
        459.0,
        2,
        "megacore",
        3,
        "https://cloud.google.com/tpu/docs/v5p",
        2765.0,
        "https://cloud.google.com/tpu/docs/v5p: HBM2e capacity and bandwidth 95 GB, 2765 GBps",
        6,
        100.0,
    ),
    "v6e": Chip(
        "v6e",
        "TPU v6 lite",
        32.0,
        918.0,
        1,
        "default",
        2,
        "https://cloud.google.com/tpu/docs/v6e",
        1638.0,
        "https://cloud.google.com/tpu/docs/v6e: HBM bandwidth per chip 1638 GBps",
        4,
        100.0,
    ),
}

# ICI per link and direction (search of the stored pages, 2026-12-07): the Cloud TPU pages give
# the bidirectional bandwidth per chip over its ports: v5p "Bidirectional inter-chip interconnect
# (ICI) bandwidth per chip (GBps) 1200" (= 6 ports x 2 directions x 100 GB/s; "4800 Gbps" in the
# older revision, one direction), v5e "400 GBps ... ICI ports per chip 4" (50 GB/s), v6e "800 GBps
# ... ICI ports per chip 4" (100 GB/s). The v4 page gives none; the TPU v4 paper (Jouppi et al.,
# ISCA 2023, as summarised at https://glennklockwood.com/garden/processors/TPUv4) gives each of its
# six links "400G bandwidth in each direction" (50 GB/s); "How to Scale Your Model"
# (jax-ml/scaling-book, tpus.md) tabulates one-way 4.5e10 B/s per link for v4p, 1e11 for v5p and
# v6e, 5e10 for v5e.
ICI_SOURCES = (
    "https://cloud.google.com/tpu/docs/v5p",
    "https://cloud.google.com/tpu/docs/v5e",
    "https://cloud.google.com/tpu/docs/v6e",
    "TPU v4 paper (ISCA 2023): six ICI links, 400 Gb/s each direction",
    "https://jax-ml.github.io/scaling-book/tpus",
)

# chips -> the physical grid of a standard slice (Cloud TPU's topology tables)
GRIDS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    768: "8x8x12",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    chip: Chip
    grid: str  # physical chips, e.g. "8x8x12"
    slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.grid.split("x")) * self.slices

    def describe(self) -> dict:
        return {
            "topology": self.name,
            "slices": self.slices,
            "chip": self.chip.name,
            "chips": self.chips,
            "grid": self.grid,
            "device_kind": self.chip.device_kind,
            "hbm_gib_per_chip_spec": self.chip.hbm_gib,
            "peak_tflops_per_chip": self.chip.peak_tflops,
            "hbm_gb_per_s": self.chip.hbm_gb_per_s,
        }


def parse_topology(name: str, slices: int = 1) -> Topology:
    """'v5p-1536' / 'v4-8' / 'v5e-16' / 'v6e-256' (Cloud TPU names) or 'v5p:8x8x12' (a grid)."""
    m = re.fullmatch(r"\s*(v4|v5e|v5p|v6e)\s*([-:])\s*(\d+(?:x\d+)*)\s*", name or "")
    if not m:
        raise TopologyError(
            f"--topology {name!r}: expected e.g. v4-8, v5e-16, v5p-1536, v6e-256 or v5p:8x8x12 "
            f"(chips: {', '.join(CHIPS)})"
        )
    if slices < 1:
        raise TopologyError(f"--slices {slices}: need at least 1")
    chip, sep, size = CHIPS[m.group(1)], m.group(2), m.group(3)
    if sep == ":":
        if len(size.split("x")) != chip.dims:
            raise TopologyError(f"--topology {name!r}: a {chip.name} grid has {chip.dims} dimensions")
        return Topology(name.strip(), chip, size, slices)
    if "x" in size:
        unit = "TensorCores" if chip.cores_per_chip_in_name > 1 else "chips"
        raise TopologyError(f"--topology {name!r}: use {chip.name}-N (N = {unit}) or {chip.name}:AxBxC")
    count = int(size)
    chips, rest = divmod(count, chip.cores_per_chip_in_name)
    grids = GRIDS_3D if chip.dims == 3 else GRIDS_2D
    if rest or chips not in grids:
        known = ", ".join(f"{chip.name}-{c * chip.cores_per_chip_in_name}" for c in sorted(grids))
        raise TopologyError(
            f"--topology {name!r}: not a standard {chip.name} slice; known: {known}; or give the "
            f"chip grid ({chip.name}:AxB{'xC' if chip.dims == 3 else ''})"
        )
    return Topology(name.strip(), chip, grids[chips], slices)


def topology_devices(name: str | Topology, slices: int = 1) -> list:
    """The devices of a described TPU topology (libtpu compiles for them; nothing runs)."""
    topo = name if isinstance(name, Topology) else parse_topology(name, slices)
    # libtpu takes a machine-wide lock for a real chip; describing a topology needs none, and two
    # planning processes (or a test and the script it starts) must not refuse each other
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax without the module
        raise TopologyError(f"this jax cannot describe topologies: {e}") from None
    kwargs = {"chip_config_name": topo.chip.chip_config}
    if topo.slices > 1:
        kwargs["num_slices"] = topo.slices
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{topo.chip.name}:{topo.grid}", **kwargs)
    except Exception as e:  # no libtpu, or libtpu refusing the shape
        raise TopologyError(
            f"cannot describe {topo.name} ({topo.chip.name}:{topo.grid}): {str(e).splitlines()[0]}; "
            "compiling for a TPU topology needs libtpu: pip install 'jax[tpu]'"
        ) from None
    return list(desc.devices)


def out_of_memory(error: Exception) -> str | None:
    """The compiler's own message when `error` is a compile refused for memory, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    return next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])


def compiler_hbm_gib(device) -> float | None:
    """The HBM the TPU compiler says one device has for a program (what a plan must fit in),
    read from its refusal of a 1 TiB buffer: "... exceeds available HBM (30.75G)"."""
    import jax
    import jax.numpy as jnp

    sharding = jax.sharding.SingleDeviceSharding(device)
    try:
        jax.jit(lambda x: x * 2, out_shardings=sharding).lower(
            jax.ShapeDtypeStruct((2**39,), jnp.bfloat16, sharding=sharding)
        ).compile()
    except Exception as e:
        m = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
        if m:
            return float(m.group(1)) * {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}[m.group(2)]
    return None


def _fits(report: dict, hbm: float | None) -> bool:
    """The TPU compiler refuses a program whose temporaries exceed HBM (`fits` false in the
    report); one it accepts still does not fit when arguments + temporaries + outputs (the peak)
    exceed it."""
    fits = report.get("fits", True)
    if fits and hbm is not None and report.get("peak_gib_per_device") is not None:
        fits = report["peak_gib_per_device"] <= hbm
    return fits


def plan_fields(topo: Topology, devices: list, report: dict) -> dict:
    """What a TPU plan adds to a dry run's report (`dry_run.dry_run`): the platform, the chip, the
    compiler's HBM, whether the plan fits (`_fits`), and the step time the model FLOPs imply at
    the chips' peak and at half of it."""
    chips = len(devices)
    peak = topo.chip.peak_tflops * 1e12 * chips
    hbm = compiler_hbm_gib(devices[0])
    return {
        "platform": "tpu",
        "device_kind": devices[0].device_kind,
        **topo.describe(),
        "hbm_gib_per_chip": hbm,
        "fits": _fits(report, hbm),
        "step_seconds_at_peak": report["model_flops_per_step"] / peak,
        "step_seconds_at_50pct": report["model_flops_per_step"] / (0.5 * peak),
    }


def decode_floor_ms(bytes_read: float, gb_per_s: float) -> float:
    """Milliseconds to read `bytes_read` once at `gb_per_s` (1e9 bytes/s): the floor of a
    memory-bound decode step, whose every weight and cached key/value is read once a token."""
    return 1e3 * bytes_read / (gb_per_s * 1e9)


def inference_fields(topo: Topology, devices: list, report: dict) -> dict:
    """What a TPU plan adds to an inference dry run's report (`dry_run.inference_dry_run`): the
    chip, the compiler's HBM, whether both programs fit (`_fits`), and the decode floor: the bytes
    a decode step reads on one chip (its share of the weights and its KV cache) over the chip's
    HBM bandwidth (`Chip.hbm_gb_per_s`)."""
    hbm = compiler_hbm_gib(devices[0])
    read = (report["weights_gib_per_device"] + report["kv_cache_gib_per_device"]) * 2**30
    return {
        "platform": "tpu",
        "device_kind": devices[0].device_kind,
        **topo.describe(),
        "hbm_gib_per_chip": hbm,
        "fits": _fits(report, hbm),
        "decode_ms_per_token_floor": decode_floor_ms(read, topo.chip.hbm_gb_per_s),
        "hbm_bandwidth_source": topo.chip.bandwidth_source,
    }
