"""Perplexity, mean NLL and bits per byte of a model, per distribution.

    scores = score_model(model, {"code": "code_val.jsonl"}, tokenizer, batch_size=8, seq_len=512)
    scores["code"].perplexity

Definitions, per distribution (natural logs throughout):

* **loss tokens**: the targets whose loss mask is set (see
  :mod:`dem_jax.data.tokenize`): for ``{"text"}`` records every token after
  BOS, EOS included; for ``{"prompt", "completion"}`` records the completion
  tokens and EOS.
* ``mean_nll`` = summed NLL over loss tokens / number of loss tokens (a
  token-weighted mean over the whole set, not a mean of per-record means);
  ``perplexity`` = exp(mean_nll).
* ``bits_per_byte`` = summed NLL / ln 2 / scored bytes, where the scored
  bytes are the UTF-8 bytes of each record's loss-bearing field as written in
  the file (``text``, or ``completion``), summed over the records that have
  at least one loss token. The prompt, the template and BOS/EOS add no bytes;
  EOS's NLL is still counted (it is what tells the model where the text
  ends). This makes bits per byte comparable across tokenizers.

Rows are packed (the default: several records per row, each its own segment,
so none attends to another) or padded (``packing=False``: one record per row).
The sums and token counts are the same either way (to float rounding); packing
just needs fewer rows. A record longer than ``seq_len`` is split, in both
modes alike, into pieces of ``seq_len`` targets (each piece scored without the
earlier pieces as context), so every target is counted exactly once. The last
batch is filled with zero-loss rows so every batch has one shape and compiles
once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dem_jax.config.run import check_prompt_template
from dem_jax.data.batches import encode_records, pad_batches
from dem_jax.data.records import read_jsonl
from dem_jax.data.tokenize import check_ids_fit, check_tokenizer_fits, load_tokenizer
from dem_jax.errors import DemError
from dem_jax.io.modeldir import Model
from dem_jax.io.progress_bar import progress_bar
from dem_jax.model.losses import batch_nll
from dem_jax.sharding.placement import check_batch_size, place_batch, place_params

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Score:
    """Scores of one model on one distribution."""

    nll_sum: float  # summed NLL over loss tokens, nats
    tokens: int  # loss tokens
    bytes: int  # scored UTF-8 bytes (see the module docstring)

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean NLL in nats (= log-perplexity)."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.mean_nll) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        """Summed NLL in bits per scored UTF-8 byte."""
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain JSON-able numbers (None where a value is undefined)."""
        out = {
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "bits_per_byte": self.bits_per_byte,
            "bytes": self.bytes,
            "nll_sum": self.nll_sum,
        }
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


# One compiled program per (config, shapes, shardings); params and batch are
# arguments, so scoring another model of the same architecture reuses it.
_batch_nll = jax.jit(batch_nll, static_argnums=1)


def score_rows(
    params: Any,
    config,
    rows: list[dict[str, np.ndarray]],
    batch_size: int,
    mesh: Mesh | None = None,
    max_batches: int = 0,
    progress: Progress | None = None,
    progress_every: int = 20,
    name: str = "",
) -> tuple[float, int]:
    """(summed NLL, loss tokens) of ``rows`` under ``params``.

    Batches are dispatched without waiting for results, so the host prepares
    batch b+1 while the device runs batch b; results are fetched every
    ``progress_every`` batches (advancing a tokens/s progress bar on stderr when
    ``progress`` is given) and summed in float64 on the host.
    """
    check_batch_size(batch_size, mesh)
    params = place_params(params, config, mesh)
    batches = pad_batches(rows, batch_size, max_batches)
    pending, total_nll, total_tokens = [], 0.0, 0
    bar = progress_bar(
        sum(int(b["loss_mask"].sum()) for b in batches),
        f"score {name}".strip(),
        unit="tok",
        enabled=progress is not None and len(batches) > progress_every,
    )
    with bar:
        for i, batch in enumerate(batches):
            pending.append(_batch_nll(params, config, place_batch(batch, mesh)))
            if (i + 1) % progress_every == 0 or i + 1 == len(batches):
                for nll, count in jax.device_get(pending):
                    total_nll += float(nll)
                    total_tokens += round(float(count))
                    bar.update(round(float(count)))
                pending = []
    return total_nll, total_tokens


def resolve_tokenizer(tokenizer, model: Model):
    """A tokenizer object from an object, a directory, or (None) the model's own files;
    a DemError if it can produce ids the model has no embedding for."""
    if tokenizer is None:
        tokenizer = load_tokenizer(model.assets_dir)
    elif isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, str(model.assets_dir or "the model"))
    return tokenizer


def score_model(
    model: Model,
    datasets: Mapping[str, str | os.PathLike | list[Mapping[str, Any]]],
    tokenizer=None,
    batch_size: int = 8,
    seq_len: int = 512,
    mesh: Mesh | None = None,
    packing: bool = True,
    template: str = "{prompt}",
    add_bos: bool = True,
    add_eos: bool = True,
    max_batches: int = 0,
    progress: Progress | None = None,
) -> dict[str, Score]:
    """Score ``model`` on each named dataset: a JSONL path or a list of records.

    ``tokenizer`` is a tokenizer, a tokenizer directory, or None for the
    model's own tokenizer files. ``packing`` (the default) puts several records
    in a row; False gives each record its own padded row (same results, more
    rows). With ``mesh`` the parameters are placed on
    their shardings and each batch is split over the data-parallel axes
    (``batch_size`` must divide by data*fsdp*expert). ``max_batches`` > 0 scores only
    the first batches of each set (bits per byte is then undefined: NaN).
    """
    if seq_len < 2:
        raise DemError(f"--seq-len must be >= 2, got {seq_len}")
    check_batch_size(batch_size, mesh)
    check_prompt_template(template, "prompt template")
    tokenizer = resolve_tokenizer(tokenizer, model)
    params = place_params(model.params, model.config, mesh)
    scores = {}
    for name, data in datasets.items():
        records = read_jsonl(data) if isinstance(data, str | os.PathLike) else data
        encoded = encode_records(records, tokenizer, seq_len, packing, template, add_bos, add_eos)
        if encoded.tokens == 0:
            raise DemError(f"{name}: no loss tokens to score (records too short?)")
        arrays = (r[k] for r in encoded.rows for k in ("tokens", "targets"))
        check_ids_fit(arrays, model.config.vocab_size, name)
        nll, tokens = score_rows(
            params, model.config, encoded.rows, batch_size, mesh, max_batches, progress, name=name
        )
        # Bytes cannot be traced back to records once rows are cut off, so a
        # truncated set reports no bits per byte rather than a wrong one.
        n_bytes = encoded.bytes if tokens == encoded.tokens else 0
        scores[name] = Score(nll, tokens, n_bytes)
    return scores


def format_table(scores: Mapping[str, Score]) -> str:
    """A plain-text table, one line per distribution."""
    width = max([len("distribution"), *map(len, scores)])
    lines = [
        f"{'distribution':<{width}}  {'tokens':>10}  {'mean_nll':>9}  "
        f"{'perplexity':>11}  {'bits/byte':>9}"
    ]
    for name, s in scores.items():
        lines.append(
            f"{name:<{width}}  {s.tokens:>10,}  {s.mean_nll:>9.4f}  "
            f"{s.perplexity:>11.3f}  {s.bits_per_byte:>9.4f}"
        )
    return "\n".join(lines)
