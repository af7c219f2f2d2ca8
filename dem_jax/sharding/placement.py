"""Placing parameters and host batches on a mesh, and the batch-size rule that goes with it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dem_jax.errors import DemError
from dem_jax.sharding.rules import BATCH_AXES, batch_sharding, param_shardings


def data_parallel_size(mesh: Mesh | None) -> int:
    """How many ways a batch is split on ``mesh`` (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh | None, where: str = "--batch-size") -> None:
    """A batch must split evenly over the mesh's data-parallel axes."""
    dp = data_parallel_size(mesh)
    if batch_size <= 0 or batch_size % dp:
        raise DemError(
            f"{where}: {batch_size} must be a positive multiple of the mesh's "
            f"data-parallel size (data*fsdp*expert = {dp})"
        )


def place_params(params: Any, config, mesh: Mesh | None) -> Any:
    """Parameters on their shardings (a no-op when they are already there)."""
    return params if mesh is None else jax.device_put(params, param_shardings(config, mesh))


def place_batch(batch: Mapping[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
    """A host batch as device arrays, split over the data-parallel axes."""
    if mesh is None:
        return {k: jax.device_put(v) for k, v in batch.items()}
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
