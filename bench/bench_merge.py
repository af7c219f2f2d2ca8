"""Merge benchmark; every number is a ratio against a baseline measured in the same run.

    python bench/bench_merge.py [--size-mb 150] [--models 2 8] [--method dem]

For 2 and 8 fine-tuned inputs (plus the base, all Hugging Face safetensors on
disk, page cache warm), in memory (every input loaded first) and streaming (one
parameter per input read at a time, output written leaf by leaf), each in its
own child process:

1. Throughput: GB of input parameters read per second by a whole
   ``merge_to_directory(format="hf")`` (second run in the child, so compilation
   is excluded), against this machine's memory bandwidth measured by a plain
   NumPy array copy (GB copied per second). The ``compute`` rows time ``merge``
   on inputs already loaded: the merge math alone, without reading or writing.
2. Peak memory: the child's peak RSS (Linux VmHWM, else ``getrusage``) against the size
   of one model, also net of the child's RSS just before merging (the JAX
   runtime and imports).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def copy_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> float:
    """GB/s of a plain NumPy array copy (each byte read once and written once)."""
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def make_models(
    root: Path, size_mb: float, n: int, dtype: str = "float32"
) -> tuple[list[Path], int]:
    """A base and ``n`` random models of about ``size_mb`` MB in float32 (in ``dtype`` on
    disk: half the bytes for bfloat16) in HF format; (paths, bytes of one model)."""
    import dem_jax

    width = 512
    layer_bytes = 4 * (4 * width * width + 3 * width * 3 * width)
    layers = max(1, int(size_mb * 1e6 / layer_bytes))
    config = dem_jax.ModelConfig(
        vocab_size=8192,
        hidden_size=width,
        intermediate_size=3 * width,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=8,
        param_dtype=dtype,
    )
    paths = []
    for i in range(n + 1):
        path = root / f"m{i}"
        if not path.exists():
            dem_jax.save_model(dem_jax.init_model(config, seed=i), path, format="hf")
        paths.append(path)
    return paths, (2 if dtype != "float32" else 4) * config.num_params


def peak_rss() -> int:
    """This process's peak resident set in bytes.

    Linux's VmHWM belongs to the current address space, so it starts afresh at
    exec; ``ru_maxrss`` would carry over the parent's resident set at fork.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> None:
    """One configuration: merge twice, report the second run's time and the peak RSS."""
    import jax
    import jax.numpy as jnp

    import dem_jax
    from dem_jax.merge.engine import MergeInput, merge
    from dem_jax.merge.output import merge_to_directory

    paths = [Path(p) for p in args.paths]
    jnp.zeros(1).block_until_ready()  # start the runtime before the baseline reading
    rss_before = peak_rss()
    base = paths[0]
    sources = paths[1:]
    if args.mode == "compute":  # inputs already in memory: the merge math alone
        base = dem_jax.load_model(base)
        sources = [dem_jax.load_model(p) for p in sources]
    settings = {"weight": 1.0 / len(sources), "density": 0.5}
    inputs = [MergeInput(p, settings) for p in sources]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        if args.mode == "compute":
            jax.block_until_ready(merge(args.method, base, inputs).params)
        else:
            merge_to_directory(
                Path(args.out),
                args.method,
                base,
                inputs,
                format="hf",
                overwrite=True,
                streaming=args.mode == "streaming",
            )
        times.append(time.perf_counter() - start)
    peak = peak_rss()
    print(json.dumps({"seconds": times[-1], "first": times[0], "peak": peak, "before": rss_before}))


def run_child(paths, method: str, mode: str, out: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        mode,
        "--method",
        method,
        "--out",
        str(out),
        "--paths",
        *map(str, paths),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=150.0, help="size of each model")
    parser.add_argument("--models", type=int, nargs="+", default=[2, 8], help="input counts")
    parser.add_argument("--method", default="dem", help="merge method (dem, ties, dare_ties...)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    root = Path(tempfile.mkdtemp(prefix="dem_bench_merge_"))
    try:
        paths, model_bytes = make_models(root, args.size_mb, max(args.models))
        bandwidth = copy_bandwidth()
        print(
            f"model: {model_bytes / 1e6:.0f} MB float32; numpy copy bandwidth "
            f"{bandwidth:.2f} GB/s; method {args.method}"
        )
        header = (
            f"{'inputs':>6} {'mode':>10} {'GB/s read':>10} {'/ copy BW':>10} "
            f"{'peak RSS/model':>15} {'(peak-start)/model':>19} {'first run s':>12}"
        )
        print(header)
        for n in args.models:
            for mode in ("compute", "memory", "streaming"):
                r = run_child(paths[: n + 1], args.method, mode, root / "out")
                read = (n + 1) * model_bytes / r["seconds"] / 1e9
                print(
                    f"{n:>6} {mode:>10} {read:>10.2f} {read / bandwidth:>10.3f} "
                    f"{r['peak'] / model_bytes:>15.2f} "
                    f"{(r['peak'] - r['before']) / model_bytes:>19.2f} {r['first']:>12.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
