"""Training metrics: JSONL (always) and TensorBoard event files (tensorboardX).

Only process 0 writes, so multi-host runs produce one log.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from dem_jax.io import storage


class MetricsWriter:
    """Append-only metrics; on resume, entries after the resumed step are dropped
    (those steps are trained again)."""

    def __init__(self, jsonl_path, tensorboard_dir, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = storage.path(jsonl_path)
        self._tb = None
        # Object stores cannot append: there the whole log is rewritten on each record.
        self._lines: list[str] | None = [] if storage.is_url(self.path) else None
        if not self.enabled:
            return
        storage.makedirs(self.path.parent)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            if self._lines is not None:
                self._lines = kept
            storage.write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, kind: str, **values: Any) -> None:
        """One record: ``kind`` is e.g. "train" or "eval/<distribution>"."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        if self._lines is not None:
            self._lines.append(json.dumps(record))
            storage.write_text(self.path, "".join(line + "\n" for line in self._lines))
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Flush TensorBoard files."""
        if self._tb is not None:
            self._tb.close()
