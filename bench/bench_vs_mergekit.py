"""`dem-jax merge` against `mergekit-yaml` as whole commands, on the same YAML, in one run.

    python bench/bench_vs_mergekit.py [--size-mb 270] [--models 3 8] [--repeats 3]
        [--methods task_arithmetic ties slerp] [--dtypes float32 bfloat16] [--engine auto]

For each dtype and input count, a base and ``--models`` fine-tunes (random Llamas of
about ``--size-mb`` MB in float32, stored in the dtype, Hugging Face format, page
cache warm after the first run) are merged by both tools with one MERGE.yaml per
method; the two commands alternate, ``--repeats`` times each, so a load change hits
both. Each is a fresh process: what a user waits for, start-up and imports included.
dem-jax runs with ``--engine`` (auto: the host executor for these methods) and its
compilation cache (as a user's second merge does) unless ``--cold``, which gives it
an empty cache every time. Methods are merge_method names (nuslerp, nearswap, sce,
passthrough: a frankenmerge of two models, slerp_slices: slerp written as one slice
with a filtered t gradient, as mergekit's examples write it; any other name gets the
fine-tunes with weights 1/n). Printed per row: the
minimum and median wall time of each tool, mergekit / dem-jax (the speed-up, from the
medians), and each tool's peak RSS (``os.wait4``) beside issue #12's goal, 1.2 x one
model + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def merge_yaml(method: str, paths: list[Path], dtype: str = "float32") -> dict:
    """A MERGE.yaml both tools accept for ``method`` over a base and fine-tunes."""
    n = len(paths) - 1
    models = [{"model": str(p), "parameters": {"weight": 1.0 / n}} for p in paths[1:]]
    cfg = {"merge_method": method, "base_model": str(paths[0]), "dtype": dtype}
    if method == "slerp":
        return {**cfg, "models": [{"model": str(paths[1])}], "parameters": {"t": 0.4}}
    if method == "linear":  # the base is averaged too, with its own weight
        every = [{"model": str(p), "parameters": {"weight": 1.0 / (n + 1)}} for p in paths]
        return {**cfg, "models": every}
    if method == "model_stock":
        return {**cfg, "models": [{"model": str(p)} for p in paths[1:]]}
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        return {**cfg, "models": models, "parameters": {"density": 0.5}}
    if method == "nuslerp":  # two task vectors
        return {**cfg, "models": models[:2]}
    if method == "nearswap":
        return {**cfg, "models": [{"model": str(paths[1])}], "parameters": {"t": 0.001}}
    if method == "multislerp":  # of the models (mergekit refuses task vectors that cancel)
        del cfg["base_model"]
        return {**cfg, "models": models}
    if method in ("karcher", "ram"):  # karcher averages the base as one more input
        return {**cfg, "models": [{"model": str(p)} for p in paths[1:]]}
    if method == "arcee_fusion":
        return {**cfg, "models": [{"model": str(paths[1])}]}
    if method == "sce":
        return {
            **cfg,
            "models": [{"model": str(p)} for p in paths[1:]],
            "parameters": {"select_topk": 0.5},
        }
    if method == "passthrough":  # a frankenmerge: every layer of one, the top half of another
        layers = json.loads((paths[1] / "config.json").read_text())["num_hidden_layers"]
        del cfg["base_model"]
        return {
            **cfg,
            "slices": [
                {"sources": [{"model": str(paths[1]), "layer_range": [0, layers]}]},
                {"sources": [{"model": str(paths[2]), "layer_range": [layers // 2, layers]}]},
            ],
        }
    if method == "slerp_slices":  # how mergekit's examples write slerp: one slice
        layers = json.loads((paths[1] / "config.json").read_text())["num_hidden_layers"]
        t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]
        return {
            "merge_method": "slerp",
            "base_model": str(paths[0]),
            "dtype": dtype,
            "slices": [
                {"sources": [{"model": str(p), "layer_range": [0, layers]} for p in paths[:2]]}
            ],
            "parameters": {"t": t},
        }
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
    parser.add_argument(
        "--models", type=int, nargs="+", default=[3], help="fine-tunes besides the base"
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--engine", default="auto", choices=["auto", "host", "jax"])
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
    print(
        f"random Llamas of {args.size_mb:.0f} MB in float32, {args.repeats} runs each, "
        f"dem-jax --engine {args.engine}, cache {'off' if args.cold else 'warm'}"
    )
    print(
        f"{'dtype':>8} {'n':>2} {'method':>16} {'dem-jax min/med s':>18} "
        f"{'mergekit min/med s':>19} {'speed-up':>9} {'RSS GB dem-jax':>15} "
        f"{'mergekit':>9} {'goal':>6}"
    )
    try:
        for dtype in args.dtypes:
            for n in args.models:
                folder = root / dtype
                folder.mkdir(exist_ok=True)
                paths, model_bytes = models_in_child(folder, args.size_mb, max(args.models), dtype)
                goal = (1.2 * model_bytes + 2**30) / 1e9
                for method in args.methods:
                    row = compare(args, root, env, method, paths[: n + 1], dtype, mergekit)
                    ours, theirs, ours_rss, theirs_rss = row
                    print(
                        f"{dtype:>8} {n:>2} {method:>16} "
                        f"{min(ours):>8.2f}/{statistics.median(ours):<9.2f} "
                        f"{min(theirs):>9.2f}/{statistics.median(theirs):<9.2f} "
                        f"{statistics.median(theirs) / statistics.median(ours):>8.2f}x "
                        f"{max(ours_rss) / 1e9:>15.2f} {max(theirs_rss) / 1e9:>9.2f} {goal:>6.2f}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def models_in_child(folder: Path, size_mb: float, n: int, dtype: str):
    """``make_models`` run in a child process: a child's ``ru_maxrss`` starts at its
    parent's resident set (it is forked before it execs), so this process must stay
    small for the children's peak RSS to be theirs."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from bench_merge import make_models; "
        "p, b = make_models(__import__('pathlib').Path(sys.argv[2]), float(sys.argv[3]), "
        "int(sys.argv[4]), sys.argv[5]); print(json.dumps([[str(x) for x in p], b]))"
    )
    here = str(Path(__file__).parent)
    args = [here, str(folder), str(size_mb), str(n), dtype]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    paths, model_bytes = json.loads(out.stdout.strip().splitlines()[-1])
    return [Path(p) for p in paths], model_bytes


def compare(args, root: Path, env: dict, method: str, paths, dtype: str, mergekit: str):
    """Both tools on one MERGE.yaml, alternating: (our seconds, theirs, our RSS, theirs)."""
    config = root / f"{method}.yaml"
    config.write_text(yaml.safe_dump(merge_yaml(method, paths, dtype)))
    ours, theirs, ours_rss, theirs_rss = [], [], [], []
    for i in range(args.repeats + 1):  # the first round warms the caches
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        cache = root / (f"xla{i}" if args.cold else "xla")
        cmd = [sys.executable, "-m", "dem_jax", "merge", str(config), "--out", str(out)]
        cmd += ["--engine", args.engine]
        s, rss = timed(cmd, {**env, "DEM_JAX_COMPILE_CACHE": str(cache)}, root / "log")
        shutil.rmtree(out, ignore_errors=True)
        mk = [mergekit, str(config), str(out), "--no-copy-tokenizer"]
        t, trss = timed(mk, env, root / "log")
        if i:
            ours.append(s), theirs.append(t), ours_rss.append(rss), theirs_rss.append(trss)
    return ours, theirs, ours_rss, theirs_rss


if __name__ == "__main__":
    main()
