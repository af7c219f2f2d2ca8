"""Which pipeline stages are complete, and for which inputs.

A stage is skipped when its output exists and its *fingerprint* (a hash of
everything its result depends on: distribution names, settings, the
modification times of the models it read) matches the one recorded when it
last completed. The record is rewritten atomically after each stage, so a
pipeline killed mid-stage re-runs only that stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dem_jax.io import storage
from dem_jax.sharding.distributed import is_main_process


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_stamp(directory: Path) -> str:
    """Identifies one written model/vector directory (it is only ever replaced whole)."""
    marker = next(
        (
            directory / n
            for n in ("dem_jax_model.json", "dem_jax_vector.json", "config.json")
            if (directory / n).exists()
        ),
        directory,
    )
    return f"{directory.name}:{storage.version_stamp(marker)}" if marker.exists() else "absent"


class StageState:
    """Fingerprints of completed stages, persisted in one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def is_done(self, stage: str, fp: str, *outputs: Path) -> bool:
        """Complete for these inputs, with every output still present."""
        entry = self.done.get(stage)
        return bool(entry) and entry["fingerprint"] == fp and all(p.exists() for p in outputs)

    def info(self, stage: str) -> dict[str, Any]:
        """What the stage recorded when it completed."""
        return self.done.get(stage, {}).get("info", {})

    def mark(self, stage: str, fp: str, **info: Any) -> None:
        """Record completion (atomically: the old file or the new, never half)."""
        self.done[stage] = {"fingerprint": fp, "info": info}
        if is_main_process():  # every process keeps the record; one writes it
            text = json.dumps(self.done, indent=2, sort_keys=True, default=str) + "\n"
            storage.write_text(self.path, text)
