"""Scoring throughput of dem-jax against transformers on a real model and real text.

    python bench/bench_score.py [--quick]

The model is SmolLM2-135M-Instruct in float32 (:func:`dem_jax.demo.smollm2.smollm2_dir`,
offline); the records are real English and Python text of varied length, built
offline from the standard library (docstrings via :func:`inspect.getdoc` and the
source of small functions), each at most ``--seq-len`` tokens with BOS and EOS so
that every scorer sees every record whole. Three scorers, timed in the same run
(best of ``--repeats`` after a warm-up), each summing the NLL of every token after
BOS:

* dem-jax packed (the ``dem-jax score`` default): several records per row of
  ``--seq-len`` tokens, kept apart by segment ids;
* dem-jax ``--no-packing``: one record per row, padded to ``--seq-len``;
* transformers: ``LlamaForCausalLM`` under ``torch.no_grad()``, the same records in
  the same order and batch size, each batch padded to its longest record (its best
  fair case), ``cross_entropy(reduction="sum")`` over the real targets.

Both frameworks use every core (``torch.set_num_threads(os.cpu_count())``; XLA's CPU
client does the same by default). tokens/s counts only real targets (no padding);
"real / computed" is the share of the positions a scorer computes that hold a
record's token (dem-jax fills its last batch with blank rows, so every batch has one
compiled shape). The ratio is against transformers in the same run (> 1: dem-jax
faster). The run fails unless both dem-jax modes' total NLL equals transformers'
within 1e-4 relative and every scorer counts the same tokens, so the table compares
like with like.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
import time

import jax
import numpy as np

import dem_jax
from dem_jax.data.batches import encode_records, pad_batches
from dem_jax.data.tokenize import encode_record, load_tokenizer
from dem_jax.demo.smollm2 import smollm2_dir
from dem_jax.search.score import score_rows

# Modules whose docstrings and small functions make the records (stdlib: always here).
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "functools", "gzip", "hashlib", "heapq", "http.client", "inspect", "ipaddress",
    "itertools", "json", "logging", "os", "pathlib", "pickle", "pprint", "random", "re",
    "shlex", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid",
    "zipfile",
)  # fmt: skip
MODES = ("packed", "padded")  # dem-jax score's default, and --no-packing


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def stdlib_texts() -> list[str]:
    """Docstrings of the modules above and of their public classes and functions,
    and the source of their short functions (code), deduplicated, in a fixed order."""
    texts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            texts.append(inspect.getdoc(obj) or "")
            if inspect.isfunction(obj):
                with contextlib.suppress(OSError, TypeError):  # no source file
                    texts.append(inspect.getsource(obj))
    seen, out = set(), []
    for text in texts:
        if len(text) >= 40 and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def build_records(tokenizer, n: int, seq_len: int) -> list[dict[str, str]]:
    """``n`` records spread over the length distribution of the texts that fit a row
    (BOS + text + EOS ≤ seq_len + 1 ids), then shuffled as a validation file would be."""
    texts = stdlib_texts()
    lengths = [len(ids) + 2 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    fitting = sorted((k, t) for k, t in zip(lengths, texts, strict=True) if k <= seq_len + 1)
    picks = np.linspace(0, len(fitting) - 1, n).round().astype(int)
    records = [{"text": fitting[i][1]} for i in picks]
    order = np.random.default_rng(0).permutation(n)
    return [records[i] for i in order]


def torch_batches(encodings, batch: int, pad_id: int):
    """(input_ids, attention_mask, labels aligned with the logits) per batch of
    ``batch`` records, padded on the right to the batch's longest record."""
    import torch

    out = []
    for i in range(0, len(encodings), batch):
        group = encodings[i : i + batch]
        width = max(len(e.ids) for e in group)
        ids = np.full((len(group), width), pad_id, np.int64)
        attention = np.zeros((len(group), width), np.int64)
        labels = np.full((len(group), width), -100, np.int64)  # labels[t] = target of t
        for j, e in enumerate(group):
            k = len(e.ids)
            ids[j, :k], attention[j, :k] = e.ids, 1
            labels[j, : k - 1] = np.where(e.loss_mask[1:], e.ids[1:], -100)
        out.append(tuple(torch.from_numpy(a) for a in (ids, attention, labels)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 records, one timed pass")
    parser.add_argument("--records", type=int, help="number of records (default 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="row length (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--repeats", type=int, help="timed passes per scorer (default 2)")
    args = parser.parse_args()
    n_records = args.records or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    seq_len, batch = args.seq_len, args.batch_size

    import torch
    import transformers

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    records = build_records(tokenizer, n_records, seq_len)
    model = dem_jax.load_model(path)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    sets = {m: encode_records(records, tokenizer, seq_len, m == "packed") for m in MODES}
    tokens = sets["padded"].tokens
    assert sets["packed"].tokens == tokens, (sets["packed"].tokens, tokens)
    encodings = [encode_record(tokenizer, r) for r in records]
    tbatches = torch_batches(encodings, batch, tokenizer.pad_token_id or 0)

    def ours(mode: str):
        def run():
            return score_rows(model.params, model.config, sets[mode].rows, batch)

        return run

    def theirs():
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, attention, labels in tbatches:
                logits = hf(input_ids=ids, attention_mask=attention).logits
                nll = torch.nn.functional.cross_entropy(
                    logits.view(-1, vocab), labels.view(-1), ignore_index=-100, reduction="sum"
                )
                total += float(nll)
                count += int((labels != -100).sum())
        return total, count

    # Warm-up (compiles dem-jax's one batch shape; first torch calls), outside the timing.
    for mode in sets:
        score_rows(model.params, model.config, sets[mode].rows[:batch], batch)
    with torch.no_grad():
        ids, attention, _ = tbatches[0]
        hf(input_ids=ids, attention_mask=attention)

    results = {}  # name: (seconds, nll, tokens, rows, batches, fill)
    for mode in MODES:
        seconds, (nll, count) = best_of(ours(mode), repeats)
        rows = len(sets[mode].rows)
        n_batches = len(pad_batches(sets[mode].rows, batch))  # the last one filled up
        real = sum(int((r["segment_ids"] > 0).sum()) for r in sets[mode].rows)
        fill = real / (n_batches * batch * seq_len)  # of the positions computed
        results[f"dem-jax {mode}"] = (seconds, nll, count, rows, n_batches, fill, seq_len)
    seconds, (nll, count) = best_of(theirs, repeats)
    width = sum(int(b[0].shape[0] * b[0].shape[1]) for b in tbatches)
    real = sum(len(e.ids) for e in encodings)
    results["transformers"] = (seconds, nll, count, len(records), len(tbatches), real / width, 0)

    t_ref, nll_ref = results["transformers"][0], results["transformers"][1]
    lengths = sorted(len(e.ids) for e in encodings)
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {sys.version.split()[0]}, {threads} cores "
        f"(torch threads {torch.get_num_threads()}), float32"
    )
    print(
        f"[score] SmolLM2-135M-Instruct, {len(records)} stdlib docstring/source records, "
        f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
        f"{tokens} loss tokens; batch {batch}, seq_len {seq_len}, best of {repeats}"
    )
    print()
    print("| scorer | rows | batches | real / computed | tokens/s | vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, _, count, rows, n_batches, fill, row_len) in results.items():
        shape = f"{rows} x {row_len}" if row_len else f"{rows} records"
        print(
            f"| {name} | {shape} | {n_batches} | {fill:.0%} | {count / seconds:,.0f} | "
            f"{t_ref / seconds:.2f}x |"
        )
    print()
    for name, (_, nll, count, *_rest) in results.items():
        print(f"  {name:<16} summed NLL {nll:.4f} over {count} tokens")
        assert count == tokens, f"{name} scored {count} tokens, not {tokens}"
        rel = abs(nll - nll_ref) / abs(nll_ref)
        assert rel <= 1e-4, f"{name}: NLL {nll} vs transformers {nll_ref} (relative {rel:.2e})"


if __name__ == "__main__":
    main()
