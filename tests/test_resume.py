"""Exact resume after SIGKILL and SIGTERM, and a multi-process run equal to one process.

Each test runs the real CLI in subprocesses. Runs are deterministic on CPU, so
a resumed run must end with exactly the parameters of an uninterrupted one.
"""

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fake_gcs import bucket, gcs_server  # noqa: F401  (fixtures)
from train_helpers import TINY, cli_env, dem_jax_cmd, load_params, run_cli

from dem_jax.io import storage

STEPS = 24
COMMON = [
    f"train.steps={STEPS}",
    "train.checkpoint_every=4",
    "train.eval_every=0",
    "train.log_every=1",
    "train.keep_checkpoints=2",
]


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", TINY, "--distribution", "reverse", f"output_dir={out}", *COMMON, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[np.ndarray]:
    """Parameters of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    done = run_cli(*train_args(out))
    assert done.returncode == 0, done.stderr
    return load_params(out / "models" / "reverse")


def committed_steps(out) -> list[int]:
    ckpt = storage.path(out) / "checkpoints" / "reverse"
    return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.exists() else []


def start_and_wait(out: Path, until, extra=(), timeout=300) -> subprocess.Popen:
    """Start a training process and return once ``until(out)`` holds (still running)."""
    proc = subprocess.Popen(
        dem_jax_cmd(*train_args(out, *extra)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + timeout
    while not until(out):
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training progress")
        time.sleep(0.02)
    return proc


def assert_same(params, reference):
    assert len(params) == len(reference)
    for a, b in zip(params, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigkill_mid_training_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    # Kill twice: once right after the first checkpoint appears (likely while
    # the async save or the next one is in flight), once later.
    for wanted in (4, 12):
        proc = start_and_wait(out, lambda o, w=wanted: max(committed_steps(o), default=0) >= w)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = run_cli(*train_args(out))
    assert done.returncode == 0, done.stderr
    assert "resumed from step" in done.stderr
    assert_same(load_params(out / "models" / "reverse"), reference)


def test_uncommitted_checkpoint_is_ignored(tmp_path, reference):
    """A save killed half-way leaves Orbax's temporary directory; it must not be used."""
    out = tmp_path / "run"
    proc = start_and_wait(out, lambda o: max(committed_steps(o), default=0) >= 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = max(committed_steps(out))
    ckpt = out / "checkpoints" / "reverse"
    partial = ckpt / f"{last + 4}.orbax-checkpoint-tmp-1234567890"
    partial.mkdir()
    (partial / "garbage").write_text("half written")
    done = run_cli(*train_args(out))
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {last}" in done.stderr
    assert_same(load_params(out / "models" / "reverse"), reference)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_sigterm_saves_checkpoint_and_resumes_exactly(tmp_path, reference, where, request):
    """Also with output_dir on (fake) Cloud Storage: checkpoints, logs and the final
    model go to gs:// and the resumed run still ends bit-identical."""
    out = tmp_path / "run" if where == "local" else f"{request.getfixturevalue('bucket')}/run"
    metrics = storage.path(out) / "logs" / "reverse.jsonl"

    def trained_some(o):
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 6

    proc = start_and_wait(out, trained_some)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    match = re.search(r"stopped by signal at step (\d+); checkpoint saved", err)
    assert match, err[-2000:]
    stopped_at = int(match.group(1))
    assert max(committed_steps(out)) == stopped_at  # the signal's own checkpoint, committed
    done = run_cli(*train_args(out))
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {stopped_at}" in done.stderr
    assert_same(load_params(storage.path(out) / "models" / "reverse"), reference)


def test_two_processes_equal_one(tmp_path, reference):
    """Two jax.distributed processes (4 CPU devices each, each reading its own half of
    every batch) train the same model as one process with 8 devices."""
    out = tmp_path / "run"
    port = 20000 + (int(time.time() * 1000) % 20000)
    procs = [
        subprocess.Popen(
            dem_jax_cmd(*train_args(out)),
            env=cli_env(
                4,
                DEM_JAX_COORDINATOR=f"127.0.0.1:{port}",
                DEM_JAX_NUM_PROCESSES="2",
                DEM_JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    params = load_params(out / "models" / "reverse")
    for a, b in zip(params, reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
