"""Accelerator check: how close dem-jax's train step, scoring and merges come to the chip.

    python bench/accelerator.py            # ~1B Llama, sequences 2048 and 8192
    python bench/accelerator.py --smoke    # tiny model, seconds, any backend (CI runs it)

On whatever JAX backend is present, for a Llama-3.2-1B-shaped model with random
weights (float32 master weights, bfloat16 compute, AdamW, remat, fused attention,
chunked cross-entropy; sharded fsdp over every local device):

* **train**: one jitted, state-donating AdamW step; model FLOP utilisation (MFU) =
  model FLOPs (6N per token plus full-square attention, PaLM's convention) per
  second over the chip's peak;
* **score**: the jitted summed-NLL forward pass used by ``dem-jax score`` and the
  weight search, tokens/s and its fraction of peak (2N per token + attention);
* **merge**: task arithmetic of a base and three fine-tunes in bfloat16 on device
  (``dem_jax.merge.engine.merge_tree``), bytes read + written per second over the
  chip's memory bandwidth;
* **memory**: the device's peak bytes in use (GPU/TPU), or the process's peak RSS
  on CPU.

Peaks come from the table below by device kind (dense bfloat16 FLOP/s, HBM
bandwidth, vendors' data sheets). On CPU there is no data sheet: the peak is a
bfloat16 (and float32) matmul and the bandwidth a large array copy measured in the
same run, so the fractions are against what this machine showed it can do.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax.config.model import ModelConfig
from dem_jax.config.run import TrainConfig
from dem_jax.merge.engine import merge_tree
from dem_jax.model.flops import forward_flops, train_flops
from dem_jax.model.losses import batch_nll
from dem_jax.model.transformer import init_params
from dem_jax.sharding.rules import batch_sharding, make_mesh, param_shardings
from dem_jax.train.optimizer import make_optimizer
from dem_jax.train.step import init_state, jit_train_step

# device_kind substring -> (dense bf16 FLOP/s, memory bandwidth B/s), per chip.
PEAKS = {
    "TPU v4": (275e12, 1.228e12),
    "TPU v5 lite": (197e12, 0.819e12),  # v5e
    "TPU v5e": (197e12, 0.819e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5": (459e12, 2.765e12),  # v5p reports "TPU v5"
    "TPU v6": (918e12, 1.640e12),  # v6e (Trillium)
    "A100": (312e12, 2.039e12),  # SXM 80GB
    "H100": (989e12, 3.35e12),  # SXM
    "H200": (989e12, 4.8e12),
}

ONE_B = dict(  # Llama-3.2-1B's shape
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_embeddings=True,
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, max_position_embeddings=256,
)  # fmt: skip


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (compilation) call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def chip_peaks(repeats: int) -> tuple[str, float, float, str]:
    """(device kind, peak FLOP/s, bandwidth B/s, where the numbers came from)."""
    device = jax.devices()[0]
    kind = device.device_kind
    for key, (flops, bw) in PEAKS.items():
        if key.lower() in kind.lower():
            return kind, flops, bw, "data sheet"
    # No data sheet (CPU, or an unknown chip): measure.
    n = 2048
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    flops = 2 * n**3 / timed(lambda: mm(a), repeats)
    big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    copy = jax.jit(lambda x: x + 1.0)
    bandwidth = 2 * big.nbytes / timed(lambda: copy(big), repeats)
    return kind, flops, bandwidth, "measured in this run (bf16 matmul, array copy)"


def peak_memory() -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "process peak RSS"


def make_batch(config: ModelConfig, batch: int, length: int, mesh) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, length + 1)).astype(np.int32)
    host = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, length), np.float32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    }
    return {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in host.items()}


def bench_train(config, params, batch, length, mesh, repeats) -> dict[str, float]:
    tx = make_optimizer(TrainConfig(steps=1000, warmup_steps=0, compute_dtype=config.dtype))
    holder = {"state": init_state(params, tx)}
    step = jit_train_step(holder["state"], config=config, tx=tx)
    data = make_batch(config, batch, length, mesh)

    def run():
        holder["state"], metrics = step(holder["state"], data)
        return metrics

    seconds = timed(run, repeats)
    holder.clear()  # free the train state before the next benchmark
    return {
        "seconds": seconds,
        "flops": train_flops(config, batch, length),
        "tokens": batch * length,
    }


def bench_score(config, params, batch, length, mesh, repeats) -> dict[str, float]:
    score = jax.jit(batch_nll, static_argnums=1)
    data = make_batch(config, batch, length, mesh)
    seconds = timed(lambda: score(params, config, data), repeats)
    return {
        "seconds": seconds,
        "flops": forward_flops(config, batch, length),
        "tokens": batch * length,
    }


def bench_merge(config, params, repeats) -> dict[str, float]:
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    models = [jax.tree.map(lambda x, i=i: x + (i + 1) * 1e-3, base) for i in range(3)]
    weights = [{"weight": w} for w in (0.5, 0.3, 0.2)]

    @jax.jit
    def merge(base, models):
        out = merge_tree("task_arithmetic", config, base, models, model_parameters=weights)
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), out)

    seconds = timed(lambda: merge(base, models), repeats)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(base))
    return {"seconds": seconds, "bytes": 5 * nbytes}  # 4 inputs read, 1 output written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model: a CI-sized run")
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 2048 8192)")
    parser.add_argument("--tokens", type=int, help="tokens per step (default 16384; smoke 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    seqs = args.seq or ([64, 128] if args.smoke else [2048, 8192])
    tokens = args.tokens or (256 if args.smoke else 16384)
    mesh = make_mesh()  # fsdp over every device
    config = ModelConfig(
        **(TINY if args.smoke else ONE_B),
        param_dtype="float32",
        dtype="bfloat16",
        remat=not args.smoke,
    )
    kind, peak, bandwidth, source = chip_peaks(args.repeats)
    n_dev = len(jax.devices())
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {n_dev} x {kind}")
    print(f"peak {peak / 1e12:.3g} TFLOP/s bf16 and {bandwidth / 1e9:.3g} GB/s per chip ({source})")
    print(f"model: {config.num_params / 1e9:.3f}B parameters, attention {config.attention}")
    init = jax.jit(init_params, static_argnums=0, out_shardings=param_shardings(config, mesh))
    params = init(config, 0)
    rows, results = (
        [],
        {"device": kind, "devices": n_dev, "peak_flops": peak, "bandwidth": bandwidth},
    )
    for length in seqs:
        batch = max(n_dev, tokens // length // n_dev * n_dev)
        for name, fn in (("train", bench_train), ("score", bench_score)):
            r = fn(config, params, batch, length, mesh, args.repeats)
            util = r["flops"] / r["seconds"] / (peak * n_dev)
            tps = r["tokens"] / r["seconds"]
            rows.append((f"{name} {batch}x{length}", f"{tps:,.0f} tokens/s", f"MFU {util:.1%}"))
            results[f"{name}_{length}"] = {**r, "tokens_per_s": tps, "utilisation": util}
    r = bench_merge(config, params, args.repeats)
    gbs = r["bytes"] / r["seconds"]
    rows.append(("merge task_arithmetic, 3 models, bf16", f"{gbs / 1e9:,.1f} GB/s",
                 f"{gbs / (bandwidth * n_dev):.1%} of bandwidth"))  # fmt: skip
    results["merge"] = {**r, "bytes_per_s": gbs, "utilisation": gbs / (bandwidth * n_dev)}
    mem, what = peak_memory()
    rows.append(("memory", f"{mem / 2**30:.2f} GiB", what))
    results["peak_memory_bytes"] = mem
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | rate | fraction of peak |\n|{'-' * (width + 2)}|---|---|")
    for what, rate, frac in rows:
        print(f"| {what:<{width}} | {rate} | {frac} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
