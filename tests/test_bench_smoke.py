"""The accelerator benchmark runs end to end on whatever backend is here (CPU in CI), so
it cannot rot between the runs on real accelerators."""

import json
import os
import subprocess
import sys

from train_helpers import ROOT


def test_accelerator_benchmark_smoke(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "bench" / "accelerator.py"), "--smoke", "--repeats", "1"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("| train 4x64", "| score 2x128", "| merge task_arithmetic", "| memory"):
        assert row in proc.stdout, proc.stdout
    results = json.loads(out.read_text())
    for key in ("train_64", "score_128"):
        assert results[key]["tokens_per_s"] > 0 and results[key]["utilisation"] > 0
    assert results["merge"]["bytes_per_s"] > 0 and results["peak_memory_bytes"] > 0
