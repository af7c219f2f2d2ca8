"""One-line progress bars (tqdm) on stderr for long work: writing weights, scoring.

``DEM_JAX_QUIET=1`` turns them off (as does ``enabled=False``); stdout stays for
results either way.
"""

from __future__ import annotations

import os
import sys
from typing import Any


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
        disable=not enabled or bool(os.environ.get("DEM_JAX_QUIET")),
    )
