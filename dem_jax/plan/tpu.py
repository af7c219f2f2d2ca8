"""TPU generations and slices: how many devices a slice such as ``v4-32`` has, and
how much HBM each one sees.

Counted as Cloud TPU names its accelerator types; one JAX device is a chip on
v4, v5e, v5p and v6e, a TensorCore on v2/v3. ``TPU_GENERATIONS`` also records
the TPU software version that ``launch/`` creates each generation's VMs with.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from dem_jax.config.run import RunConfig
from dem_jax.errors import DemError

GiB = 2**30


@dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation, as Cloud TPU names and sizes its slices."""

    name: str  # accelerator-type prefix, e.g. "v5litepod"
    hbm_per_device: int  # bytes of HBM one JAX device sees
    suffix_counts: str  # what the number in "v4-8" counts: "cores" or "chips"
    cores_per_chip: int
    devices_per_chip: int  # JAX devices per chip (1 with megacore, v4/v5p)
    chips_per_host: int  # chips per TPU VM of a multi-host slice
    runtime_version: str  # the TPU software version for JAX on this generation


# Cloud TPU documentation: v4 32 GiB HBM per chip, 2 TensorCores as one device
# (v4-8 = 8 cores = 4 chips); v5e "v5litepod-N" counts chips, 16 GiB each; v5p
# "v5p-N" counts cores (v5p-32 = 16 chips), 95 GiB per chip; v6e "v6e-N" counts
# chips, 32 GiB each; v2/v3 count cores and each core is its own device.
TPU_GENERATIONS: dict[str, TpuGeneration] = {
    g.name: g
    for g in (
        TpuGeneration("v2", 8 * GiB, "cores", 2, 2, 4, "tpu-ubuntu2204-base"),
        TpuGeneration("v3", 16 * GiB, "cores", 2, 2, 4, "tpu-ubuntu2204-base"),
        TpuGeneration("v4", 32 * GiB, "cores", 2, 1, 4, "tpu-ubuntu2204-base"),
        TpuGeneration("v5litepod", 16 * GiB, "chips", 1, 1, 8, "v2-alpha-tpuv5-lite"),
        TpuGeneration("v5p", 95 * GiB, "cores", 2, 1, 4, "v2-alpha-tpuv5"),
        TpuGeneration("v6e", 32 * GiB, "chips", 1, 1, 8, "v2-alpha-tpuv6e"),
    )
}
GENERATION_ALIASES = {"v5e": "v5litepod"}


@dataclass(frozen=True)
class TpuSlice:
    """A slice such as ``v4-32``: how many devices, hosts and bytes each."""

    accelerator_type: str  # as gcloud spells it, e.g. "v5litepod-16"
    generation: TpuGeneration
    chips: int
    devices: int
    hosts: int

    @property
    def hbm_per_device(self) -> int:
        """Bytes of HBM per JAX device."""
        return self.generation.hbm_per_device


def parse_slice(name: str) -> TpuSlice:
    """``"v4-8"``, ``"v5litepod-16"`` (or ``"v5e-16"``), ``"v5p-32"``, ``"v6e-8"`` -> TpuSlice."""
    m = re.fullmatch(r"\s*(v\d+[a-z]*)-(\d+)\s*", name.lower())
    prefix = GENERATION_ALIASES.get(m.group(1), m.group(1)) if m else None
    if prefix not in TPU_GENERATIONS:
        known = ", ".join(f"{g}-N" for g in TPU_GENERATIONS)
        raise DemError(f"--slice: unknown TPU slice {name!r} (known: {known}; v5e-N = v5litepod-N)")
    gen = TPU_GENERATIONS[prefix]
    count = int(m.group(2))
    per_unit = gen.cores_per_chip if gen.suffix_counts == "cores" else 1
    if count <= 0 or count % per_unit:
        raise DemError(
            f"--slice: {name!r}: {gen.name} slices count {gen.suffix_counts}, "
            f"{per_unit} per chip, so the number must be a positive multiple of {per_unit}"
        )
    chips = count // per_unit
    hosts = max(1, math.ceil(chips / gen.chips_per_host))
    return TpuSlice(f"{gen.name}-{count}", gen, chips, chips * gen.devices_per_chip, hosts)


def resolve_slice(run: RunConfig, config_path: str | os.PathLike, name: str | None) -> TpuSlice:
    """The slice to plan for: ``--slice``, else ``mesh.slice``."""
    name = name or run.mesh.slice
    if not name:
        raise DemError(f"{config_path}: which TPU slice? pass --slice, e.g. --slice v4-8")
    return parse_slice(name)
