"""XLA's persistent compilation cache for every ``dem-jax`` command.

Compiling is a large share of a command's time on small and mid-sized models (a TIES
merge of a 280 MB model compiles eight programs in about 5 s, more than it spends
reading and writing), and users run the same shapes again and again: the next merge
with other weights, a resumed training run, the scoring of each candidate model.
JAX can keep compiled programs on disk; ``dem-jax`` turns that on, under
``$DEM_JAX_CACHE/xla`` (else ``~/.cache/dem-jax/xla``), capped in size with the
least recently used programs evicted. ``DEM_JAX_COMPILE_CACHE=0`` turns it off,
``DEM_JAX_COMPILE_CACHE=DIR`` puts it elsewhere, and a cache the user configured for
JAX itself (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MAX_BYTES = 4 * 2**30  # least recently used programs are evicted beyond this
MIN_COMPILE_SECONDS = 0.5  # quicker compiles are not worth a file


def cache_root() -> Path:
    """Where dem-jax keeps what it builds once: ``$DEM_JAX_CACHE`` or ``~/.cache/dem-jax``."""
    return Path(os.environ.get("DEM_JAX_CACHE") or Path.home() / ".cache" / "dem-jax")


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at dem-jax's; the directory, or None
    when it is off or JAX's own setting is in force."""
    setting = os.environ.get("DEM_JAX_COMPILE_CACHE", "")
    jax = sys.modules.get("jax")  # not imported yet: JAX reads the settings from the environment
    own = (
        jax.config.jax_compilation_cache_dir if jax else os.environ.get("JAX_COMPILATION_CACHE_DIR")
    )
    if setting == "0" or own:
        return None
    directory = Path(setting) if setting else cache_root() / "xla"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as without a cache
    settings = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECONDS,
        "jax_compilation_cache_max_size": MAX_BYTES,
    }
    for name, value in settings.items():
        if jax is not None:
            jax.config.update(name, value)
        else:  # a command that never imports JAX (a host merge) pays nothing here
            os.environ[name.upper()] = str(value)
    return directory
