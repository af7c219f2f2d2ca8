"""Shared test fixtures.

Eight simulated CPU devices are set up before JAX is imported, so sharding
tests can build real meshes; everything else runs on device 0 as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
import tempfile
from pathlib import Path

# One compilation cache for the whole session, inherited by the CLI subprocesses
# the tests start: identical programs (the same tiny model in many runs) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dem_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

sys.path.insert(0, str(Path(__file__).parent))


# The longest tests (each a pipeline of several CLI runs) start first, and idle workers
# steal queued tests (--dist worksteal in pyproject): one started last would otherwise
# run alone at the end while the other cores idle.
_LONGEST = (  # 60-190 s each on 2 cores
    "test_chain_on_two_processes_equals_one",
    "test_two_processes_equal_one",
    "test_pipeline_with_every_path_on_gcs",
    "test_adding_a_distribution_trains_only_it",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.name.startswith(_LONGEST))  # stable otherwise
