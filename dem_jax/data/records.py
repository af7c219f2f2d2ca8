"""JSONL data files.

A record is either ``{"text": ...}`` (loss on every token) or
``{"prompt": ..., "completion": ...}`` (loss on the completion only). Other
keys (an ``answer`` to check, an id) are kept and ignored here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage


def check_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one record's shape; ``where`` is "file:line" for the message."""
    if not isinstance(record, dict):
        raise DemError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DemError(f"{where}: 'text' must be a string")
        return record
    if "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DemError(f"{where}: {key!r} must be a string")
        return record
    raise DemError(f"{where}: needs a 'text' field, or 'prompt' and 'completion' fields")


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines skipped), validated."""
    path = storage.path(path)
    if not path.is_file():
        raise DemError(f"{path}: data file not found")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DemError(f"{path}:{number}: malformed JSON ({e.msg})") from None
            records.append(check_record(record, f"{path}:{number}"))
    if not records:
        raise DemError(f"{path}: no records (the file is empty)")
    return records


def split_validation(
    records: list[dict[str, Any]], fraction: float, seed: int, where: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministically hold out ``fraction`` of the records (at least one of each side)."""
    if len(records) < 2:
        raise DemError(f"{where}: needs at least 2 records to split off validation data")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(len(records) - 1, max(1, round(fraction * len(records))))
    val_idx = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
