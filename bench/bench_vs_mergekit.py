"""`dem-jax merge` against `mergekit-yaml` as whole commands, on the same YAML, in one run.

    python bench/bench_vs_mergekit.py [--size-mb 270] [--models 3] [--repeats 3]
        [--methods task_arithmetic ties slerp]

A base and ``--models`` fine-tunes (random float32 Llamas of about ``--size-mb`` MB in
Hugging Face format, page cache warm after the first run) are merged by both tools
with one MERGE.yaml per method; the two commands alternate, ``--repeats`` times each,
so a load change hits both. Each is a fresh process: what a user waits for, start-up
and imports included. dem-jax runs with its compilation cache (as a user's second
merge does) unless ``--cold``, which gives it an empty cache every time. Printed per
method: the minimum and median wall time of each tool, mergekit / dem-jax (the speed-up,
from the medians), and each tool's peak RSS (``os.wait4``) beside 1.2 x one model + 1 GiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_merge import make_models


def merge_yaml(method: str, paths: list[Path]) -> dict:
    """A MERGE.yaml both tools accept for ``method`` over a base and fine-tunes."""
    n = len(paths) - 1
    models = [{"model": str(p), "parameters": {"weight": 1.0 / n}} for p in paths[1:]]
    cfg = {"merge_method": method, "base_model": str(paths[0]), "dtype": "float32"}
    if method == "slerp":
        return {**cfg, "models": [{"model": str(paths[1])}], "parameters": {"t": 0.4}}
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        return {**cfg, "models": models, "parameters": {"density": 0.5}}
    return {**cfg, "models": models}


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command run to completion (``os.wait4``
    gives that child's own resource usage)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed: {log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=270.0)
    parser.add_argument("--models", type=int, default=3, help="fine-tunes besides the base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "slerp"])
    parser.add_argument("--cold", action="store_true", help="no dem-jax compilation cache")
    args = parser.parse_args()
    mergekit = shutil.which("mergekit-yaml")
    if mergekit is None:
        raise SystemExit('mergekit-yaml not found: pip install -e ".[test]"')

    root = Path(tempfile.mkdtemp(prefix="dem_bench_vs_mergekit_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DEM_JAX_QUIET": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    try:
        (root / "models").mkdir()
        paths, model_bytes = make_models(root / "models", args.size_mb, args.models)
        print(
            f"{model_bytes / 1e6:.0f} MB float32 Llama, base + {args.models} fine-tunes, "
            f"{args.repeats} runs each, dem-jax cache {'off' if args.cold else 'warm'}"
        )
        print(
            f"{'method':>16} {'dem-jax min/med s':>18} {'mergekit min/med s':>19} "
            f"{'speed-up':>9} {'peak RSS GB dem-jax':>20} {'mergekit':>9}"
        )
        goal = (1.2 * model_bytes + 2**30) / 1e9
        print(f"(the RSS goal of issue #12: <= 1.2 x one model + 1 GiB = {goal:.2f} GB)")
        for method in args.methods:
            config = root / f"{method}.yaml"
            config.write_text(yaml.safe_dump(merge_yaml(method, paths)))
            ours, theirs, ours_rss, theirs_rss = [], [], [], []
            for i in range(args.repeats + 1):  # the first round warms the caches
                out = root / "out"
                shutil.rmtree(out, ignore_errors=True)
                cache = root / (f"xla{i}" if args.cold else "xla")
                cmd = [sys.executable, "-m", "dem_jax", "merge", str(config), "--out", str(out)]
                s, rss = timed(cmd, {**env, "DEM_JAX_COMPILE_CACHE": str(cache)}, root / "log")
                shutil.rmtree(out, ignore_errors=True)
                mk = [mergekit, str(config), str(out), "--no-copy-tokenizer"]
                t, trss = timed(mk, env, root / "log")
                if i:
                    ours.append(s), theirs.append(t), ours_rss.append(rss), theirs_rss.append(trss)
            print(
                f"{method:>16} {min(ours):>8.2f}/{statistics.median(ours):<9.2f} "
                f"{min(theirs):>9.2f}/{statistics.median(theirs):<9.2f} "
                f"{statistics.median(theirs) / statistics.median(ours):>8.2f}x "
                f"{max(ours_rss) / 1e9:>20.2f} {max(theirs_rss) / 1e9:>9.2f}",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
