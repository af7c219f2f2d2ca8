"""Scoring throughput of dem-jax against transformers, timed in the same run.

    python bench/bench_score.py [--quick]

Both score the same random Llama model (float32, CPU) on the same rows: a
batch of full rows of random tokens, summed NLL over every target. dem-jax
runs :func:`dem_jax.search.score.score_rows` (jitted, batches dispatched without
waiting, one host sync per 20 batches); transformers runs the model under
``torch.no_grad()`` and ``cross_entropy(reduction="sum")`` batch by batch.
The printed ratio is transformers' time / dem-jax's time (> 1: dem-jax faster).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from common import llama_pair

from dem_jax.data.packing import make_rows, stack_rows
from dem_jax.data.tokenize import Encoding
from dem_jax.search.score import score_rows


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    args = parser.parse_args()
    import torch

    vocab, seq_len, batch = 4096, 256, 8
    n_rows = 32 if args.quick else 96
    repeats = 2 if args.quick else 3
    hf, model = llama_pair(vocab)

    rng = np.random.default_rng(0)
    docs = [
        Encoding(rng.integers(0, vocab, seq_len + 1).astype(np.int32), np.ones(seq_len + 1, bool))
        for _ in range(n_rows)
    ]
    rows = make_rows(docs, seq_len, packing=False)  # one full row per document
    batches = [stack_rows(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    tokens = sum(int(r["loss_mask"].sum()) for r in rows)

    def ours():
        return score_rows(model.params, model.config, rows, batch)[0]

    def theirs():
        total = 0.0
        with torch.no_grad():
            for b in batches:
                logits = hf(torch.tensor(b["tokens"], dtype=torch.long)).logits
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, vocab),
                        torch.tensor(b["targets"].reshape(-1), dtype=torch.long),
                        reduction="sum",
                    )
                )
        return total

    ours()  # compile once, outside the measurement
    theirs()
    t_ours, nll_ours = best_of(ours, repeats)
    t_theirs, nll_theirs = best_of(theirs, repeats)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores")
    print(
        f"[score] Llama 4 layers, width 256, vocab {vocab}, {n_rows} rows x {seq_len} tokens, "
        f"batch {batch}, float32"
    )
    print(f"  summed NLL: dem-jax {nll_ours:.2f}, transformers {nll_theirs:.2f}")
    print(f"  transformers {tokens / t_theirs:9.0f} tokens/s  (baseline)")
    print(f"  dem-jax      {tokens / t_ours:9.0f} tokens/s  ratio {t_theirs / t_ours:.2f}")


if __name__ == "__main__":
    main()
