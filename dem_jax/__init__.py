"""dem-jax: Distribution Edited Models in JAX.

The public API is re-exported here (see :mod:`dem_jax.api`), imported on first use:
``import dem_jax`` and ``dem-jax --help`` do not load JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module it lives in
_EXPORTS = {
    "DemError": "dem_jax.errors",
    "Model": "dem_jax.io.modeldir",
    "ModelConfig": "dem_jax.config.model",
    "RopeScaling": "dem_jax.config.model",
    "forward": "dem_jax.api",
    "init_model": "dem_jax.io.models",
    "load_model": "dem_jax.io.models",
    "make_mesh": "dem_jax.sharding.rules",
    "save_model": "dem_jax.io.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dem_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
