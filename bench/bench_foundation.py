"""Foundation benchmarks; every number is a ratio against a baseline timed in the same run.

    python bench/bench_foundation.py [--size-mb 200] [--quick]

1. Conversion throughput: `dem-jax` HF -> Orbax and Orbax -> HF, in MB/s of
   safetensors bytes, against a plain `safetensors.numpy.load_file` of the
   same files (page cache warm for both).
2. Compile time of a 32-layer against a 4-layer model (same width): layers
   are scanned, so the ratio should stay near 1.
3. Forward tokens/s of dem-jax against transformers (PyTorch, CPU, float32)
   on the same random model and tokens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from common import best_of, llama_pair

import dem_jax
from dem_jax.model import transformer as model_lib


def bench_conversion(size_mb: float, repeats: int) -> None:
    width = 512
    layer_bytes = 4 * (4 * width * width + 3 * width * 4 * width)
    layers = max(1, int(size_mb * 1e6 / layer_bytes))
    config = dem_jax.ModelConfig(
        vocab_size=8192,
        hidden_size=width,
        intermediate_size=4 * width,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=8,
    )
    root = Path(tempfile.mkdtemp(prefix="dem_bench_"))
    try:
        dem_jax.save_model(
            dem_jax.init_model(config), root / "hf", format="hf", max_shard_bytes=64 * 2**20
        )
        files = sorted((root / "hf").glob("*.safetensors"))
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        from safetensors.numpy import load_file, save_file

        def plain_read():
            for f in files:
                tensors = load_file(f)
                del tensors

        def plain_copy():
            shutil.rmtree(root / "copy", ignore_errors=True)
            (root / "copy").mkdir()
            for f in files:
                save_file(load_file(f), root / "copy" / f.name, metadata={"format": "pt"})

        def load_only():
            model = dem_jax.load_model(root / "hf")
            jax.block_until_ready(model.params)

        def hf_to_orbax():
            shutil.rmtree(root / "orbax", ignore_errors=True)
            model = dem_jax.load_model(root / "hf")
            dem_jax.save_model(model, root / "orbax", format="orbax")

        def orbax_to_hf():
            shutil.rmtree(root / "back", ignore_errors=True)
            model = dem_jax.load_model(root / "orbax")
            dem_jax.save_model(model, root / "back", format="hf", max_shard_bytes=64 * 2**20)

        plain_read()  # warm the page cache for every contender alike
        t_plain = best_of(plain_read, repeats)
        t_copy = best_of(plain_copy, repeats)
        t_load = best_of(load_only, repeats)
        t_in = best_of(hf_to_orbax, repeats)
        t_out = best_of(orbax_to_hf, repeats)
        print(f"[convert] model {total_mb:.0f} MB ({layers} layers, {len(files)} shards)")
        print(f"  plain safetensors read        {total_mb / t_plain:7.0f} MB/s  (read baseline)")
        print(
            f"  dem-jax load_model (HF)       {total_mb / t_load:7.0f} MB/s  "
            f"ratio {t_plain / t_load:.2f} vs read"
        )
        print(f"  plain safetensors read+write  {total_mb / t_copy:7.0f} MB/s  (copy baseline)")
        print(
            f"  convert hf-to-orbax           {total_mb / t_in:7.0f} MB/s  "
            f"ratio {t_copy / t_in:.2f} vs copy"
        )
        print(
            f"  convert orbax-to-hf           {total_mb / t_out:7.0f} MB/s  "
            f"ratio {t_copy / t_out:.2f} vs copy"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compile_seconds(layers: int) -> float:
    config = dem_jax.ModelConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=4,
    )
    params = model_lib.param_shapes(config)
    tokens = jax.ShapeDtypeStruct((4, 128), np.int32)
    fn = jax.jit(model_lib.apply, static_argnums=1)
    start = time.perf_counter()
    fn.lower(params, config, tokens).compile()
    return time.perf_counter() - start


def bench_compile() -> None:
    compile_seconds(2)  # pay one-time tracing/import costs outside the measurement
    t4, t32 = compile_seconds(4), compile_seconds(32)
    print("[compile] forward, width 256, batch 4 x 128")
    print(f"  4 layers  {t4:6.2f} s")
    print(f"  32 layers {t32:6.2f} s   ratio 32/4 = {t32 / t4:.2f} (unrolled layers would be ~8)")


def bench_forward(repeats: int) -> None:
    import torch

    hf, model = llama_pair()
    batch, length = 8, 256
    tokens = np.random.default_rng(0).integers(0, 4096, (batch, length))
    torch_tokens = torch.tensor(tokens)

    def ours():
        dem_jax.forward(model, tokens).block_until_ready()

    def theirs():
        with torch.no_grad():
            hf(torch_tokens)

    ours()
    theirs()
    t_ours, t_theirs = best_of(ours, repeats), best_of(theirs, repeats)
    n = batch * length
    print(f"[forward] Llama 4 layers, width 256, batch {batch} x {length}, float32, CPU")
    print(f"  transformers {n / t_theirs:9.0f} tokens/s  (baseline)")
    print(f"  dem-jax      {n / t_ours:9.0f} tokens/s  ratio {t_theirs / t_ours:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="model size to convert")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller model")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores")
    bench_conversion(args.size_mb / (4 if args.quick else 1), repeats)
    bench_compile()
    bench_forward(repeats)


if __name__ == "__main__":
    main()
