"""Shared by the benchmark scripts: timing and process measurements, the same small Llama
in both frameworks, and real text for the real model.

The scripts run as ``python bench/NAME.py``, so this module imports as ``common``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sysconfig
import tempfile
import threading
import time
from pathlib import Path


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (the least noisy estimate on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def llama_pair(vocab: int = 4096, train: bool = False):
    """(transformers model, dem-jax Model) with identical random weights: Llama,
    4 layers, width 256, 8 heads / 4 KV heads, float32; torch uses every core."""
    import torch
    import transformers

    import dem_jax

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    hf = transformers.LlamaForCausalLM(config)
    hf = hf.train() if train else hf.eval()
    root = Path(tempfile.mkdtemp(prefix="dem_bench_"))
    try:
        hf.save_pretrained(root)
        model = dem_jax.load_model(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return hf, model


def peak_rss() -> int:
    """This process's peak resident set, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ProcessSampler(threading.Thread):
    """RSS and CPU time of process ``pid`` every ``interval`` seconds:
    ``samples`` = [(unix time, RSS bytes, CPU seconds)]."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self.tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, StopIteration):
                return
            cpu = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
            self.samples.append((time.time(), rss, cpu))
            time.sleep(self.interval)

    def cpu_at(self, when: float) -> float:
        """CPU seconds at unix time ``when``, interpolated between samples."""
        before = [s for s in self.samples if s[0] <= when] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= when] or self.samples[-1:]
        (t0, _, c0), (t1, _, c1) = before[-1], after[0]
        return c0 if t1 <= t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def write_text_data(out: Path, target_chars: int) -> tuple[Path, Path]:
    """(train.jsonl, val.jsonl) of real text: standard-library source files, one record
    per file piece of at most 4000 characters, in a fixed order; every 10th to val."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    train, val, total, n = [], [], 0, 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text), 4000):
            piece = text[start : start + 4000]
            (val if n % 10 == 9 else train).append(json.dumps({"text": piece}))
            n, total = n + 1, total + len(piece)
        if total >= target_chars:
            break
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(train) + "\n")
    (out / "val.jsonl").write_text("\n".join(val) + "\n")
    return out / "train.jsonl", out / "val.jsonl"


def real_batches(train_file: Path, count: int, batch: int, seq: int) -> list[dict]:
    """The first ``count`` packed (batch, seq) numpy batches of ``train_file``, in file
    order, tokenised by SmolLM2's tokenizer and packed by dem-jax's own data code."""
    from dem_jax.data.packing import make_rows, stack_rows
    from dem_jax.data.records import read_jsonl
    from dem_jax.data.tokenize import encode_record, load_tokenizer
    from dem_jax.demo.smollm2 import smollm2_dir

    tokenizer = load_tokenizer(smollm2_dir())
    encodings, tokens = [], 0
    for record in read_jsonl(train_file):
        encodings.append(encode_record(tokenizer, record))
        tokens += len(encodings[-1].ids)
        if tokens > (count + 1) * batch * (seq + 1):
            break
    rows = make_rows(encodings, seq, packing=True)
    if len(rows) < count * batch:
        raise SystemExit(f"{train_file}: only {len(rows)} rows, need {count * batch}")
    return [stack_rows(rows[i * batch : (i + 1) * batch]) for i in range(count)]
