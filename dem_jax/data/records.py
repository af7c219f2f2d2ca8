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

from dem_jax.errors import DemError, first_line
from dem_jax.io import storage


def check_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one record's shape; ``where`` is "file:line" for the message."""
    if not isinstance(record, dict):
        raise DemError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        _check_text(record, "text", where)
        return record
    if "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            _check_text(record, key, where)
        return record
    raise DemError(f"{where}: needs a 'text' field, or 'prompt' and 'completion' fields")


def _check_text(record: dict[str, Any], key: str, where: str) -> None:
    value = record[key]
    if not isinstance(value, str):
        raise DemError(f"{where}: {key!r} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
        raise DemError(
            f"{where}: {key!r} is not valid Unicode text (unpaired surrogate "
            f"\\u{ord(value[e.start]):04x} at character {e.start})"
        ) from None


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """All records of a UTF-8 JSONL file (blank lines skipped), validated; any problem
    is a DemError naming the file and line."""
    path = storage.path(path)
    if path.is_dir():
        raise DemError(f"{path}: is a directory, expected a JSONL data file")
    if not path.is_file():
        raise DemError(f"{path}: data file not found")
    records = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if limit is not None and len(records) >= limit:
                    break
                line = _decode(raw, f"{path}:{number}", first=number == 1)
                if not line.strip():
                    continue
                records.append(check_record(_parse(line, f"{path}:{number}"), f"{path}:{number}"))
    except OSError as e:
        raise DemError(f"{path}: cannot read ({first_line(e)})") from None
    if not records:
        raise DemError(f"{path}: no records (the file is empty)")
    return records


def _decode(raw: bytes, where: str, first: bool) -> str:
    """One line of bytes as text (a UTF-8 byte order mark on the first line is dropped)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DemError(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "JSONL data files must be UTF-8"
        ) from None


def _parse(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DemError(f"{where}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise DemError(f"{where}: malformed JSON (nested too deeply)") from None


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
