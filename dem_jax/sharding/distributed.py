"""Multi-host start-up: one process per host, joined with jax.distributed.

* On Cloud TPU set ``DEM_JAX_DISTRIBUTED=auto``: JAX finds the coordinator itself.
* Elsewhere (GPU clusters, several local CPU processes in tests) set
  ``DEM_JAX_COORDINATOR=host:port``, ``DEM_JAX_NUM_PROCESSES`` and
  ``DEM_JAX_PROCESS_ID``.
Without these variables the run is single-process.
"""

from __future__ import annotations

import os

from dem_jax.errors import DemError
from dem_jax.lazy import jax, process_index

_initialized = False


def initialize_from_env() -> None:
    """Call ``jax.distributed.initialize`` once if the environment asks for it."""
    global _initialized
    if _initialized:
        return
    coordinator = os.environ.get("DEM_JAX_COORDINATOR")
    if coordinator:
        try:
            num = int(os.environ["DEM_JAX_NUM_PROCESSES"])
            pid = int(os.environ["DEM_JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise DemError(
                "DEM_JAX_COORDINATOR is set: DEM_JAX_NUM_PROCESSES and DEM_JAX_PROCESS_ID "
                "must be integers"
            ) from None
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
        _initialized = True
    elif os.environ.get("DEM_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        _initialized = True


def is_main_process() -> bool:
    """True on the process that writes reports, logs and final directories."""
    return process_index() == 0
