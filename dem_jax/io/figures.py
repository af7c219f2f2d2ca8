"""PNG figures: matplotlib on the Agg backend, written through :mod:`dem_jax.io.storage`
(so to local paths and URLs alike).

matplotlib is optional at run time: without it :func:`pyplot` returns None and the
callers skip their pictures (the JSON and CSV files they write carry the numbers).
"""

from __future__ import annotations

import io
import os
from typing import Any

from dem_jax.io import storage

try:
    import matplotlib
    import matplotlib.pyplot as plt
except ImportError:  # pictures are skipped without matplotlib
    matplotlib = plt = None


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    if plt is None:
        return None
    matplotlib.use("Agg")  # files only: no display needed, safe on headless hosts
    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG to a local path or URL, then close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    storage.write_bytes(path, buf.getvalue())
    plt.close(fig)
