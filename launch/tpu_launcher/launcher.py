"""`Launcher`: carries out the commands on one or more slices.

Create a slice, install dem-jax, copy files, run jobs through preemptions (the
restart loop, `Launcher.babysit`), train in turn or in parallel, the pipeline.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LaunchError, StepFailed
from .gcloud import NOT_FOUND, Tpu, next_action, parse_state
from .jobs import export_argv, merge_job, search_argv, train_jobs
from .runner import Runner
from .settings import Settings
from .worker_scripts import (
    REMOTE_CONFIG,
    REMOTE_MERGE_CONFIG,
    SOURCE_ARCHIVE,
    install_script,
    job_script,
    setup_script,
    source_kind,
)


@dataclass
class Launcher:
    """Carries out the commands on one or more slices."""

    settings: Settings
    runner: Runner
    installed: set = field(default_factory=set)  # slices set up by this process
    _packed: str | None = field(default=None, repr=False)
    _pack_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dry(self) -> bool:
        return self.runner.dry

    def tpu(self, suffix: str | None = None) -> Tpu:
        base = self.settings.get("TPU_NAME")
        return Tpu(f"{base}-{suffix}" if suffix else base, self.settings)

    def check(self, argv: list[str], what: str) -> None:
        rc = self.runner.run(argv).returncode
        if rc != 0:
            raise StepFailed(f"{what} failed (exit status {rc})")

    def state(self, tpu: Tpu) -> str:
        return parse_state(self.runner.run(tpu.describe(), capture=True), tpu.queued)

    def wait_ready(self, tpu: Tpu) -> None:
        """Poll until the slice is READY/ACTIVE; a LaunchError if it is lost or missing."""
        while True:
            state = self.state(tpu)
            action = next_action(state)
            if action == "run":
                return
            if action != "wait":
                raise LaunchError(f"{tpu.name}: {state} while waiting for it to be ready")
            self.runner.log(f"{tpu.name}: {state}; waiting")
            self.runner.sleep(self.settings.number("POLL_SECONDS"))

    def create(self, tpu: Tpu) -> None:
        """Create the slice unless it exists; wait until it is ready."""
        state = self.state(tpu)
        if next_action(state) == "recreate":
            raise LaunchError(
                f"{tpu.name} is {state}: `delete` it first (train, search and export "
                "re-create lost slices themselves)"
            )
        if state == NOT_FOUND:
            self.check(tpu.create(), f"creating {tpu.name}")
        self.wait_ready(tpu)

    def pack_source(self) -> str | None:
        """The local file to copy for DEM_JAX_SOURCE (a source directory is packed once)."""
        source = self.settings.get("DEM_JAX_SOURCE")
        kind = source_kind(source)
        if kind == "file":
            return source
        if kind != "dir":
            return None
        with self._pack_lock:  # parallel slices share one archive
            if self._packed is None:
                self._packed = self._pack(source)
            return self._packed

    def _pack(self, source: str) -> str:
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), SOURCE_ARCHIVE)
        excludes = [
            ".git",
            ".venv",
            "venv",
            "__pycache__",
            "*.egg-info",
            "build",
            "dist",
            "runs",
            "launch-logs",
        ]
        argv = ["tar", "-czf", out, *[f"--exclude={e}" for e in excludes], "-C", source, "."]
        self.check(argv, f"packing {source}")
        return out

    def copy_files(self, tpu: Tpu) -> None:
        """The run config, a local MERGE_CONFIG and the packed source, to every worker."""
        s, remote = self.settings, self.settings.get("REMOTE_DIR")
        self.check(tpu.scp_to(s.get("CONFIG"), f"{remote}/{REMOTE_CONFIG}"), "copying CONFIG")
        merge = s.get("MERGE_CONFIG")
        if merge and not merge.startswith("gs://"):
            self.check(tpu.scp_to(merge, f"{remote}/{REMOTE_MERGE_CONFIG}"), "copying MERGE")
        source = self.pack_source()
        if source:
            name = SOURCE_ARCHIVE if source_kind(s.get("DEM_JAX_SOURCE")) == "dir" else None
            dest = f"{remote}/dist/{name or Path(source).name}"
            self.check(tpu.scp_to(source, dest), "copying DEM_JAX_SOURCE")

    def install(self, tpu: Tpu) -> None:
        """Python, JAX for TPUs and dem-jax on every worker; the run config copied."""
        self.check(tpu.ssh(setup_script(self.settings)), f"setting up {tpu.name}")
        self.copy_files(tpu)
        self.check(tpu.ssh(install_script(self.settings)), f"installing dem-jax on {tpu.name}")

    def sync(self, tpu: Tpu) -> None:
        """Copy the config and code again and reinstall dem-jax (slice already set up)."""
        self.copy_files(tpu)
        self.check(tpu.ssh(install_script(self.settings, reinstall=True)), "reinstalling")

    def run_job(self, tpu: Tpu, job: str, argv: list[str], pre: list[str] = ()) -> int:
        return self.runner.run(tpu.ssh(job_script(self.settings, job, argv, pre))).returncode

    def babysit(self, tpu: Tpu, job: str, argv: list[str], pre: list[str] = ()) -> int:
        """Run a job to completion on ``tpu`` through preemptions: create the slice if
        missing, re-create it when lost, reinstall, and run the job again (it resumes)."""
        s, log = self.settings, self.runner.log
        creations = failures = 0
        while True:
            state = self.state(tpu)
            action = next_action(state)
            if action == "create":
                if creations > s.number("MAX_RESTARTS"):
                    log(f"{tpu.name}: gave up after {creations - 1} re-creations")
                    return 1
                creations += 1
                self.installed.discard(tpu.name)
                if self.runner.run(tpu.create()).returncode != 0:
                    log(f"{tpu.name}: create failed; trying again")
                    self.runner.sleep(s.number("POLL_SECONDS"))
            elif action == "recreate":
                log(f"{tpu.name}: {state}; deleting it to create it again")
                self.runner.run(tpu.delete())
            elif action == "wait":
                log(f"{tpu.name}: {state}; waiting")
                self.runner.sleep(s.number("POLL_SECONDS"))
            else:
                rc = self._install_and_run(tpu, job, argv, pre)
                if rc in (0, 2):  # done, or dem-jax refused its input: no retry can help
                    log(f"{tpu.name}: {job} {'done' if rc == 0 else 'stopped on bad input'}")
                    return rc
                # A preempted slice may still read READY for a moment: look again later.
                self.runner.sleep(s.number("POLL_SECONDS"))
                if next_action(self.state(tpu)) != "run":
                    log(f"{tpu.name}: {job} interrupted (exit status {rc}); slice lost")
                    continue
                if rc == 143:  # SIGTERM on a healthy slice: someone stopped it on purpose
                    log(f"{tpu.name}: {job} was stopped (SIGTERM); not restarting it")
                    return rc
                failures += 1
                if failures > s.number("MAX_FAILURES"):
                    log(f"{tpu.name}: {job} failed (exit status {rc})")
                    return rc
                log(f"{tpu.name}: {job} exited with {rc} on a healthy slice; running it again")

    def _install_and_run(self, tpu: Tpu, job: str, argv: list[str], pre: list[str]) -> int:
        try:
            if tpu.name not in self.installed:
                self.install(tpu)
                self.installed.add(tpu.name)
            return self.run_job(tpu, job, argv, pre)
        except StepFailed as e:  # maybe preempted mid-install: the caller looks at the slice
            self.runner.log(str(e))
            return 1

    def fetch_logs(self, tpu: Tpu) -> None:
        """Every worker's logs/ to LOG_DIR/<slice>/ here."""
        s = self.settings
        local = os.path.join(s.get("LOG_DIR") or os.path.join("launch-logs", s.get("TPU_NAME")))
        local = os.path.join(local, tpu.name)
        if not self.dry:
            os.makedirs(local, exist_ok=True)
        self.check(tpu.scp_from(f"{s.get('REMOTE_DIR')}/logs", local), "fetching logs")

    def train(self, names=None, parallel=None, mixture=None, keep=False) -> int:
        """Train each distribution: in turn on TPU_NAME, or each on its own slice at once."""
        s = self.settings
        jobs = train_jobs(s, names, mixture)
        parallel = s.flag("PARALLEL") if parallel is None else parallel
        if not parallel:
            tpu = self.tpu()
            for job, _, argv in jobs:
                rc = self.babysit(tpu, job, argv)
                if rc:
                    return rc
            return 0

        def one(job, suffix, argv) -> int:
            tpu = self.tpu(suffix)
            rc = self.babysit(tpu, job, argv)
            try:
                self.fetch_logs(tpu)
            except LaunchError as e:
                self.runner.log(str(e))
            if rc == 0 and not keep:
                self.runner.run(tpu.delete())
            return rc

        if self.dry:  # deterministic output: one slice after another
            codes = [one(*j) for j in jobs]
        else:
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                codes = list(pool.map(lambda j: one(*j), jobs))
        return next((c for c in codes if c), 0)

    def delete_all(self, include_parallel: bool = True) -> None:
        """Delete TPU_NAME and (with PARALLEL) the per-distribution slices."""
        tpus = [self.tpu()]
        if include_parallel and self.settings.flag("PARALLEL"):
            tpus += [self.tpu(suffix) for _, suffix, _ in train_jobs(self.settings)]
        for tpu in tpus:
            self.runner.run(tpu.delete())

    def pipeline(self, delete: bool | None = None) -> int:
        """Train every distribution (creating and installing as needed), search, merge
        (with MERGE_CONFIG), export, fetch the logs, and delete (DELETE_AFTER)."""
        s = self.settings
        tpu = self.tpu()
        rc = self.train()
        if rc:
            return rc
        steps = [("search", search_argv(s), [])]
        if s.get("MERGE_CONFIG"):
            pre, argv = merge_job(s)
            steps.append(("merge", argv, pre))
        steps.append(("export", export_argv(s), []))
        for job, argv, pre in steps:
            rc = self.babysit(tpu, job, argv, pre)
            if rc:
                return rc
        self.fetch_logs(tpu)
        if s.flag("DELETE_AFTER") if delete is None else delete:
            self.delete_all()
        return 0
