"""The whole chain on two jax.distributed processes equals one process.

Train two distributions (one run SIGKILLed on every process after its first
committed checkpoint, then resumed), take their distribution vectors, merge them
with a mergekit YAML and score the merge: once as one process with 8 CPU
devices (the reference), once as two local processes with 4 CPU devices each,
joined through DEM_JAX_COORDINATOR / DEM_JAX_NUM_PROCESSES / DEM_JAX_PROCESS_ID,
every process running the same command as on a multi-host pod. Settings are
test_resume's, so the two share the session's compilation cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from test_resume import STEPS, assert_same, committed_steps, train_args
from train_helpers import ROOT, cli_env, dem_jax_cmd, load_params, run_cli

from dem_jax.vectors.store import load_vector

PROCESSES = 2
DEVICES = 8  # in all: 4 CPU devices per process, 8 in the one-process reference
KILLED = "reverse"  # test_resume's distribution: killed, then resumed
OTHER = "sort"  # trained without interruption
FIRST_CHECKPOINT = 4  # COMMON's train.checkpoint_every: the kill follows its commit
# A mesh over all DEVICES: a process that has not joined the others (it sees only
# its own devices) stops with an error instead of quietly running alone. (Without a
# mesh a model would go to jax.devices()[0], which only process 0 can address.)
MESH = ("--mesh", f"fsdp={DEVICES}")
# Training: the same all-device mesh, and a short final validation (not compared).
TRAIN_EXTRA = ("train.eval_batches=1", f"mesh.fsdp={DEVICES}")
TIMEOUT = 300  # seconds for one command on all processes (it takes ~5-30 s)
SCORE_DATA = {n: ROOT / "configs" / "tiny" / f"{n}.val.jsonl" for n in (KILLED, OTHER)}
MERGE_YAML = f"""\
merge_method: dem
base_model: models/base
models:
  - model: vectors/{KILLED}
    parameters: {{weight: 0.7}}
  - model: vectors/{OTHER}
    parameters: {{weight: 0.4}}
"""


def training(out: Path, name: str) -> list:
    """test_resume's training command, on distribution ``name``."""
    args = train_args(out, *TRAIN_EXTRA)
    args[args.index("--distribution") + 1] = name
    return args


def chain_commands(out: Path) -> dict[str, list]:
    """vectors -> merge -> score on a run directory holding base and both fine-tunes."""
    (out / "merge.yaml").write_text(MERGE_YAML)
    models = [f"--model={n}={out / 'models' / n}" for n in (KILLED, OTHER)]
    base = f"--base={out / 'models' / 'base'}"
    data = [f"--data={n}={path}" for n, path in SCORE_DATA.items()]
    return {
        "vectors": ["vectors", base, *models, "--out", out / "vectors"],
        "merge": ["merge", out / "merge.yaml", "--out", out / "merged"],
        "score": ["score", "--model", out / "merged", *data, "--seq-len", "64", "--json"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """One command started on every process of a local jax.distributed group, each
    in its own process group (killed whole on failure), output in files."""

    def __init__(self, args, logs: Path, name: str):
        port, self.name = free_port(), name
        logs.mkdir(exist_ok=True)
        self.logs = [(logs / f"{name}.{i}.out", logs / f"{name}.{i}.err") for i in range(PROCESSES)]
        self.procs = []
        for i, (out, err) in enumerate(self.logs):
            env = cli_env(
                DEVICES // PROCESSES,
                DEM_JAX_COORDINATOR=f"127.0.0.1:{port}",
                DEM_JAX_NUM_PROCESSES=str(PROCESSES),
                DEM_JAX_PROCESS_ID=str(i),
            )
            with out.open("w") as stdout, err.open("w") as stderr:
                self.procs.append(
                    subprocess.Popen(
                        dem_jax_cmd(*args),
                        env=env,
                        stdout=stdout,
                        stderr=stderr,
                        start_new_session=True,
                    )
                )

    def output(self, i: int) -> tuple[str, str]:
        return tuple(path.read_text() for path in self.logs[i])

    def report(self, codes) -> str:
        tails = (f"--- process {i} ---\n{self.output(i)[1][-3000:]}" for i in range(PROCESSES))
        head = f"{self.name}: exit codes {codes} (None: still running, killed)\n"
        return head + "\n".join(tails)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def wait_until(self, condition, timeout: float = TIMEOUT) -> None:
        """Return once ``condition()`` holds, every process still running."""
        deadline = time.monotonic() + timeout
        while not condition():
            codes = [p.poll() for p in self.procs]
            if any(c is not None for c in codes) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"ended early or timed out: {self.report(codes)}")
            time.sleep(0.02)

    def finish(self, timeout: float = TIMEOUT) -> list[tuple[str, str]]:
        """Wait for every process to succeed; (stdout, stderr) of each."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                if any(p.poll() for p in self.procs):  # the others may wait for it at a barrier
                    deadline = min(deadline, time.monotonic() + 10)
                time.sleep(0.05)
            codes = [p.poll() for p in self.procs]
        finally:
            self.kill()
        assert codes == [0] * PROCESSES, self.report(codes)
        return [self.output(i) for i in range(PROCESSES)]


def run_all(args, logs: Path, name: str) -> list[tuple[str, str]]:
    return Processes(args, logs, name).finish()


def scores(stdout: str) -> dict[str, dict]:
    """`score --json`'s distributions; gloo prints its connection lines on stdout too."""
    start = ("\n" + stdout).index("\n{\n")  # where the line "{" starts in stdout
    return json.JSONDecoder().raw_decode(stdout, start)[0]["distributions"]


def reference_chain(out: Path) -> dict[str, str]:
    """The one-process run; stdout of each chain command."""
    for args in (training(out, KILLED), training(out, OTHER)):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    printed = {}
    for name, args in chain_commands(out).items():
        done = run_cli(*args, *MESH)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        printed[name] = done.stdout
    return printed


def train_losses(out: Path, name: str) -> tuple[list[int], list[float]]:
    """Steps and losses of the training log (process 0 alone writes it; a resumed run
    drops the entries after its checkpoint)."""
    rows = [json.loads(line) for line in (out / "logs" / f"{name}.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    return [r["step"] for r in train], [r["loss"] for r in train]


def vector_leaves(directory: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(load_vector(directory).params)]


def assert_close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    """test_resume's tolerance for two processes against one (reduction order differs)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def leftovers(root: Path) -> list[str]:
    """Temporary or replaced outputs that an atomic write left behind."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".tmp-" in p.name or ".old-" in p.name or "orbax-checkpoint-tmp" in p.name
    )


def test_chain_on_two_processes_equals_one(tmp_path):
    ref, run, logs = tmp_path / "reference", tmp_path / "run", tmp_path / "logs"
    reference = reference_chain(ref)

    # Train KILLED, SIGKILL every process once the first checkpoint is committed.
    started = Processes(training(run, KILLED), logs, "killed")
    started.wait_until(lambda: max(committed_steps(run), default=0) >= FIRST_CHECKPOINT)
    started.kill()
    last = max(committed_steps(run))
    assert last < STEPS and not (run / "models" / KILLED).exists()

    # Restart on both processes: it resumes from the newest committed checkpoint.
    for _, err in run_all(training(run, KILLED), logs, "resumed"):
        assert f"resumed from step {last}" in err, err[-2000:]
    run_all(training(run, OTHER), logs, "other")
    printed = {
        name: run_all([*args, *MESH], logs, name) for name, args in chain_commands(run).items()
    }

    # The same seed initialises the same base on any mesh.
    assert_same(load_params(run / "models" / "base"), load_params(ref / "models" / "base"))
    for name in (KILLED, OTHER):
        assert_close(load_params(run / "models" / name), load_params(ref / "models" / name))
        assert_close(vector_leaves(run / "vectors" / name), vector_leaves(ref / "vectors" / name))
    assert_close(load_params(run / "merged"), load_params(ref / "merged"))

    for name in (KILLED, OTHER):
        steps, losses = train_losses(run, name)
        assert steps == list(range(1, STEPS + 1)), name  # one record per step: one writer
        np.testing.assert_allclose(losses, train_losses(ref, name)[1], rtol=1e-5)

    want = scores(reference["score"])
    assert all("{" not in stdout for stdout, _ in printed["score"][1:])  # process 0 prints
    for stdout, _ in printed["score"][:1]:
        got = scores(stdout)
        assert got.keys() == want.keys() == SCORE_DATA.keys()
        for name, s in got.items():
            assert s["tokens"] == want[name]["tokens"]
            np.testing.assert_allclose(s["mean_nll"], want[name]["mean_nll"], rtol=1e-6)
            np.testing.assert_allclose(s["nll_sum"], want[name]["nll_sum"], rtol=1e-6)

    # Outputs appear once and whole: the same files as one process wrote, no
    # temporary or half-replaced directories left by either process.
    for rel in ("merged", "vectors", f"vectors/{KILLED}", "models", f"models/{KILLED}"):
        assert sorted(p.name for p in (run / rel).iterdir()) == sorted(
            p.name for p in (ref / rel).iterdir()
        ), rel
    assert (run / "merged" / "config.json").read_bytes() == (
        ref / "merged" / "config.json"
    ).read_bytes()
    assert leftovers(run / "models") == leftovers(run / "vectors") == []
    assert [p.name for p in run.glob(".*")] == []
