"""Fixed-length training rows from variable-length encodings.

A row holds ``seq_len`` positions, each with an input token, the target
(the next token), a loss weight, a segment id (0 = padding, 1, 2, ... one per
document in the row) and a position within its document. Packing puts
several documents in one row; the model's segment mask keeps them from
attending to each other, so packed loss equals the loss of each document run
alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from dem_jax.data.tokenize import Encoding

ROW_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _pieces(encoding: Encoding, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs+1 ids, mask) pieces of at most seq_len + 1 tokens; consecutive pieces
    overlap by one token so every target is predicted exactly once."""
    ids, mask = encoding.ids, encoding.loss_mask
    if len(ids) < 2:
        return
    for start in range(0, len(ids) - 1, seq_len):
        end = min(start + seq_len + 1, len(ids))
        yield ids[start:end], mask[start:end]


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row with no tokens: no loss, segment 0 (padding attends only to padding)."""
    return {
        "tokens": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }


def _place(row, offset: int, segment: int, ids: np.ndarray, mask: np.ndarray) -> int:
    n = len(ids) - 1
    row["tokens"][offset : offset + n] = ids[:-1]
    row["targets"][offset : offset + n] = ids[1:]
    row["loss_mask"][offset : offset + n] = mask[1:]
    row["segment_ids"][offset : offset + n] = segment
    row["positions"][offset : offset + n] = np.arange(n)
    return offset + n


def make_rows(
    encodings: Iterable[Encoding], seq_len: int, packing: bool = True
) -> list[dict[str, np.ndarray]]:
    """Rows of length ``seq_len``, in input order.

    With ``packing`` documents are appended to the current row while they fit
    (a document longer than a row is split into row-sized pieces); without,
    each piece gets a row of its own, padded.
    """
    rows: list[dict[str, np.ndarray]] = []
    row, offset, segment = empty_row(seq_len), 0, 0
    for encoding in encodings:
        for ids, mask in _pieces(encoding, seq_len):
            n = len(ids) - 1
            if offset and (not packing or offset + n > seq_len):
                rows.append(row)
                row, offset, segment = empty_row(seq_len), 0, 0
            segment += 1
            offset = _place(row, offset, segment, ids, mask)
    if offset:
        rows.append(row)
    return rows


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batch: each field stacked to (B, seq_len)."""
    return {k: np.stack([r[k] for r in rows]) for k in ROW_FIELDS}
