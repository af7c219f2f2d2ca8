"""One-line progress bars (tqdm) on stderr for long work: writing weights, scoring.

``DEM_JAX_QUIET=1`` turns them off, as do ``enabled=False`` and the
:func:`silenced` block (``dem-jax merge --quiet``); stdout stays for results either way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

_silenced = 0  # depth of nested silenced() blocks


def progress_bar(total: float, desc: str, unit: str = "B", enabled: bool = True) -> Any:
    """A tqdm bar with rate and ETA; bytes are shown in KiB/MiB/GiB."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
        leave=True,  # the finished bar stays: one line per task in a log
        disable=not enabled or _silenced > 0 or bool(os.environ.get("DEM_JAX_QUIET")),
    )


@contextlib.contextmanager
def silenced(enabled: bool = True) -> Iterator[None]:
    """No progress bar starts inside the block (when ``enabled``)."""
    global _silenced
    _silenced += bool(enabled)
    try:
        yield
    finally:
        _silenced -= bool(enabled)
