"""Scoring and evaluation batches: records tokenised into unpacked rows, padded
to whole batches (the last filled with zero-loss rows so every batch compiles once)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dem_jax.data.packing import empty_row, make_rows, stack_rows
from dem_jax.data.tokenize import encode_record


@dataclass
class EncodedSet:
    """One distribution's scoring rows and what the byte count needs."""

    rows: list[dict[str, np.ndarray]]
    tokens: int  # loss tokens over all rows
    bytes: int  # scored bytes
    records: int


def scored_text(record: Mapping[str, Any]) -> str:
    """The loss-bearing field of a record, whose bytes bits-per-byte divides by."""
    return record["text"] if "text" in record else record["completion"]


def encode_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer,
    seq_len: int,
    packing: bool = False,
    template: str = "{prompt}",
    add_bos: bool = True,
    add_eos: bool = True,
) -> EncodedSet:
    """Tokenise records into scoring rows (longer documents split into pieces)."""
    encodings, n_bytes, n_records = [], 0, 0
    for record in records:
        encoding = encode_record(tokenizer, record, template, add_bos, add_eos)
        encodings.append(encoding)
        n_records += 1
        if encoding.loss_mask[1:].any():  # position 0 is never a target
            n_bytes += len(scored_text(record).encode("utf-8"))
    rows = make_rows(encodings, seq_len, packing)
    tokens = int(sum(r["loss_mask"].sum() for r in rows))
    return EncodedSet(rows, tokens, n_bytes, n_records)


def pad_batches(
    rows: list[dict[str, np.ndarray]], batch_size: int, max_batches: int = 0
) -> list[dict[str, np.ndarray]]:
    """Batches (B, T) of ``rows``; the last filled with blank rows. ``max_batches`` > 0
    keeps only the first that many."""
    if max_batches:
        rows = rows[: max_batches * batch_size]
    if not rows:
        return []
    n = math.ceil(len(rows) / batch_size)
    blank = empty_row(len(rows[0]["tokens"]))
    rows = rows + [blank] * (n * batch_size - len(rows))
    return [stack_rows(rows[i * batch_size : (i + 1) * batch_size]) for i in range(n)]
