"""Shared by the benchmark scripts: timing, and the same small Llama in both frameworks.

The scripts run as ``python bench/NAME.py``, so this module imports as ``common``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
