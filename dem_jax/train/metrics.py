"""Training metrics: JSONL (always) and TensorBoard event files (tensorboardX).

Only process 0 writes, so multi-host runs produce one log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
    """Append-only metrics; on resume, entries after the resumed step are dropped
    (those steps are trained again)."""

    def __init__(self, jsonl_path: Path, tensorboard_dir: Path | None, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(jsonl_path)
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, kind: str, **values: Any) -> None:
        """One record: ``kind`` is e.g. "train" or "eval/<distribution>"."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
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
