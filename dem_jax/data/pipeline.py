"""grain pipelines: distributions -> rows -> shuffled, per-host batches.

Each distribution's JSONL is tokenised once into rows (packed or padded, see
:mod:`dem_jax.data.packing`). Training draws from a ``grain.MapDataset``:
rows shuffled by seed (a new order every epoch), repeated, optionally mixed
across distributions with given proportions, sliced so each host reads only
its own share, and batched. The iterator's state is a small dict saved with
every checkpoint, so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from dem_jax.config.run import DataConfig
from dem_jax.data.packing import empty_row, make_rows, stack_rows
from dem_jax.data.records import read_jsonl, split_validation
from dem_jax.data.tokenize import encode_record
from dem_jax.errors import DemError, did_you_mean
from dem_jax.io import storage


@dataclass
class Split:
    """One distribution's rows for one split, plus what scoring needs to know."""

    name: str
    rows: list[dict[str, np.ndarray]]
    loss_tokens: int  # number of targets that count in the loss
    num_records: int


def _tokenize(data: DataConfig, tokenizer, records, name: str, split: str) -> Split:
    encodings = [
        encode_record(tokenizer, r, data.prompt_template, data.add_bos, data.add_eos)
        for r in records
    ]
    rows = make_rows(encodings, data.seq_len, data.packing)
    if not rows:
        raise DemError(f"data.distributions.{name}: {split} split has no tokens to train on")
    loss_tokens = int(sum(r["loss_mask"].sum() for r in rows))
    if loss_tokens == 0:
        raise DemError(f"data.distributions.{name}: {split} split has no loss tokens")
    return Split(name, rows, loss_tokens, len(records))


def distribution_records(data: DataConfig, name: str) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of one distribution: its ``validation`` file, or
    the held-out fraction of its training file (fixed by ``data.shuffle_seed``, so
    training, scoring and search all hold out the same records)."""
    if name not in data.distributions:
        known = ", ".join(data.distributions) or "none"
        raise DemError(
            f"unknown distribution {name!r} ({did_you_mean(name, data.distributions)}"
            f"configured: {known})"
        )
    dist = data.distributions[name]
    records = read_jsonl(dist.train, dist.max_examples)
    if dist.validation is not None:
        return records, read_jsonl(dist.validation)
    return split_validation(
        records, dist.validation_fraction, data.shuffle_seed, f"data.distributions.{name}"
    )


def load_splits(data: DataConfig, tokenizer, name: str) -> tuple[Split, Split]:
    """(train, validation) rows of one distribution."""
    train, val = distribution_records(data, name)
    return (
        _tokenize(data, tokenizer, train, name, "train"),
        _tokenize(data, tokenizer, val, name, "validation"),
    )


def load_validation(data: DataConfig, tokenizer, name: str) -> Split:
    """The validation rows of one distribution alone. Its training file is still read
    (a held-out fraction comes from it) but not tokenised: a run evaluates on every
    distribution and trains on one, and need not hold the others' training rows."""
    _, val = distribution_records(data, name)
    return _tokenize(data, tokenizer, val, name, "validation")


def mixture_weights(
    data: DataConfig, splits: dict[str, Split], proportions_path: Path | None = None
) -> dict[str, float]:
    """Normalised proportions for the data-mixing baseline. ``data.mixture: taskpgm``
    reads them from ``proportions_path`` (``{name: p}``, written by ``dem-jax mixture``)."""
    if data.mixture == "uniform":
        raw = {n: 1.0 for n in splits}
    elif data.mixture == "size":
        raw = {n: float(s.loss_tokens) for n, s in splits.items()}
    elif data.mixture == "taskpgm":
        raw = read_proportions(proportions_path, list(splits))
    else:
        unknown = sorted(set(data.mixture) - set(splits))
        if unknown:
            raise DemError(f"data.mixture: unknown distribution {unknown[0]!r}")
        raw = {n: float(data.mixture.get(n, 0.0)) for n in splits}
        if any(v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
            raise DemError("data.mixture: weights must be >= 0 and not all zero")
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}


def read_proportions(path: Path | None, names: list[str]) -> dict[str, float]:
    """TaskPGM proportions of ``names`` from ``path`` (not renormalised)."""
    if path is None or not storage.path(path).exists():
        raise DemError(
            f"{path}: TaskPGM proportions not found "
            "(compute them with: dem-jax mixture CONFIG.yaml)"
        )
    stored = json.loads(storage.path(path).read_text())
    missing = [n for n in names if n not in stored]
    if missing:
        raise DemError(
            f"{path}: no proportion for distribution {missing[0]!r} "
            "(recompute with: dem-jax mixture CONFIG.yaml)"
        )
    raw = {n: float(stored[n]) for n in names}
    if any(v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
        raise DemError(f"{path}: proportions must be >= 0 and not all zero")
    return raw


def train_dataset(
    splits: dict[str, Split],
    weights: dict[str, float] | None,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite dataset of this host's batches (global_batch / process_count rows each)."""
    if global_batch % process_count:
        raise DemError(
            f"train.batch_size ({global_batch}) must be divisible by the number of "
            f"hosts ({process_count})"
        )
    parts = []
    for i, (_, split) in enumerate(sorted(splits.items())):
        # Each distribution gets its own shuffle seed so adding one leaves the
        # others' order unchanged.
        parts.append(grain.MapDataset.source(split.rows).shuffle(seed=seed + 7919 * i).repeat())
    if len(parts) == 1:
        ds = parts[0]
    else:
        names = sorted(splits)
        if weights is None:
            raise DemError("several distributions need mixture weights")
        kept = [(p, weights[n]) for p, n in zip(parts, names, strict=True) if weights[n] > 0]
        ds = grain.MapDataset.mix([p for p, _ in kept], weights=[w for _, w in kept])
    ds = ds[process_index::process_count]
    return ds.batch(global_batch // process_count, batch_fn=stack_rows)


class BatchIterator:
    """Checkpointable iterator over a dataset of batches."""

    def __init__(self, dataset: grain.MapDataset):
        self._it = iter(dataset.to_iter_dataset())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-able position in the stream."""
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from a state returned by :meth:`get_state`."""
        self._it.set_state(state)


def eval_batches(
    split: Split, batch_size: int, max_batches: int = 0, process_index=0, process_count=1
) -> list[dict[str, np.ndarray]]:
    """This host's fixed-size evaluation batches; the last one padded with
    zero-loss rows, so every batch has one shape and every host the same count."""
    rows = split.rows
    if max_batches:
        rows = rows[: max_batches * batch_size]
    n_batches = math.ceil(len(rows) / batch_size)
    n_batches = math.ceil(n_batches / process_count) * process_count  # equal share per host
    padded = rows + [empty_row(len(rows[0]["tokens"]))] * (n_batches * batch_size - len(rows))
    mine = range(process_index, n_batches, process_count)
    return [stack_rows(padded[b * batch_size : (b + 1) * batch_size]) for b in mine]


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This host's share of a batch -> global arrays split over the mesh's data axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
