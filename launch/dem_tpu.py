#!/usr/bin/env python3
"""DEM on Cloud TPU VMs: from nothing to a trained, merged, exported model.

    launch/dem_tpu.py pipeline --env my-tpu.env             # everything, in order
    launch/dem_tpu.py train --env my-tpu.env --dry-run      # print the gcloud commands only

Every setting comes from one env file (see launch/dem-tpu.env.example), never
from edits to this script. Every command takes ``--env FILE``, ``--set
KEY=VALUE`` (repeatable, wins over the file) and ``--dry-run`` (print the exact
commands, one per line, shell-quoted, and run nothing).

Commands run on every worker of the slice at once (``--worker=all``): one
process per host, as ``jax.distributed.initialize()`` expects. Long jobs
(train, search, merge, export) start detached on the workers (``setsid
nohup``), log to ``REMOTE_DIR/logs/HOST/JOB.log`` and are followed over ssh;
a dropped connection does not stop them, and running the same job again
re-attaches instead of starting a second copy.

Spot and preemptible slices are babysat: the slice's state is polled; when it is
PREEMPTED / SUSPENDED (or otherwise gone) it is deleted and created again,
dem-jax is reinstalled and the same command runs again, resuming from its
latest checkpoint in output_dir.

Needs only Python 3.9+ and the gcloud CLI on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

REQUIRED = object()  # marks a setting without a default

# name: (default, help). Keys are checked: a typo in the env file is an error.
SETTINGS: dict[str, tuple[object, str]] = {
    "PROJECT": (REQUIRED, "Google Cloud project id"),
    "ZONE": (REQUIRED, "zone of the TPUs, e.g. us-central2-b"),
    "TPU_NAME": (REQUIRED, "TPU VM name; per-distribution slices are TPU_NAME-DIST"),
    "ACCELERATOR_TYPE": (REQUIRED, "slice type: v4-8, v5litepod-16, v5p-32, v6e-8, ..."),
    "RUNTIME_VERSION": ("", "TPU software version (default: the one for the generation)"),
    "SPOT": ("false", "true: Spot VMs (preemptible at any time, cheaper)"),
    "PREEMPTIBLE": ("false", "true: legacy preemptible TPU (not with QUEUED)"),
    "QUEUED": ("false", "true: ask through a queued resource and wait in line for capacity"),
    "VALID_UNTIL_DURATION": ("", "queued: drop the request if unfilled after this, e.g. 6h"),
    "CREATE_FLAGS": ("", "extra create flags, shell words, e.g. --network=my-net"),
    "BUCKET": ("", "gs://bucket, usable as ${BUCKET} in other values"),
    "CONFIG": (REQUIRED, "run config YAML on this machine; copied to every worker"),
    "OUTPUT_DIR": ("", "if set, passed as output_dir=... to every dem-jax run (gs://...)"),
    "DISTRIBUTIONS": (REQUIRED, "space-separated names from the config's data.distributions"),
    "PARALLEL": ("false", "true: one slice per distribution, trained at the same time"),
    "MIXTURE": ("false", "true: also train the data-mixing baseline (--mixture)"),
    "TRAIN_OVERRIDES": ("", "extra key=value overrides for dem-jax train, shell words"),
    "SEARCH_OVERRIDES": ("", "extra key=value overrides for dem-jax search, shell words"),
    "MERGE_CONFIG": ("", "optional mergekit-style MERGE.yaml (local file or gs://) to run"),
    "MERGE_OUT": ("", "where `merge` writes, in HF format (default OUTPUT_DIR/models/merge-hf)"),
    "MERGED_DIR": ("", "the DEM model `export` converts (default OUTPUT_DIR/models/dem)"),
    "HF_DIR": ("", "Hugging Face export directory (default OUTPUT_DIR/models/dem-hf)"),
    "MESH": ("fsdp=-1", "--mesh for merge and export: shard over every chip of the slice"),
    "DEM_JAX_SOURCE": (
        REQUIRED,
        "what to pip install: a requirement (git+https://...@ref), a local .whl/.tar.gz, "
        "or a local source directory (packed and copied)",
    ),
    "INSTALLER": ("uv", "uv (fetches Python PYTHON_VERSION itself) or pip (needs python3.X)"),
    "PYTHON_VERSION": ("3.11", "Python on the workers"),
    "JAX_REQUIREMENT": ("jax[tpu]", "the TPU build of JAX, installed with dem-jax"),
    "REMOTE_DIR": ("dem-jax", "working directory on each worker, relative to its home"),
    "PASS_ENV": ("", "names of variables of this shell to pass to the workers (HF_TOKEN ...)"),
    "LOG_DIR": ("", "where `logs` puts worker logs here (default launch-logs/TPU_NAME)"),
    "POLL_SECONDS": ("60", "seconds between state polls"),
    "MAX_RESTARTS": ("20", "slice re-creations (preemptions) allowed per job"),
    "MAX_FAILURES": ("2", "re-runs of a job that failed on a healthy slice"),
    "DELETE_AFTER": ("false", "pipeline: delete the slices at the end"),
}
REMOTE_ENV_PREFIX = "REMOTE_ENV_"  # REMOTE_ENV_XLA_FLAGS=... exports XLA_FLAGS on the workers

# Default TPU software version per generation (Cloud TPU docs, "TPU software
# versions"); must agree with dem_jax.plan.TPU_GENERATIONS.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class LaunchError(Exception):
    """Bad settings or a failed step; the message says which."""


class StepFailed(LaunchError):
    """A command this script ran exited non-zero."""


def read_env_file(path: str | os.PathLike, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``KEY=VALUE`` lines (shell quoting, ``#`` comments, optional ``export``).

    ``${NAME}`` in a value expands an earlier key of the file or, failing that,
    a variable of ``environ`` (default: this process's environment).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise LaunchError(f"{path}: cannot read env file ({e.strerror})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise LaunchError(f"{where}: {e}") from None
        if words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        if len(words) != 1 or "=" not in words[0]:
            raise LaunchError(f"{where}: expected KEY=VALUE (quote a value that has spaces)")
        key, _, value = words[0].partition("=")
        values[check_key(key, where)] = expand(value, {**environ, **values}, where)
    return values


def check_key(key: str, where: str) -> str:
    """A known setting name, or a LaunchError naming the typo."""
    if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
        raise LaunchError(f"{where}: {key!r} is not a setting name (UPPER_CASE)")
    if key not in SETTINGS and not key.startswith(REMOTE_ENV_PREFIX):
        raise LaunchError(
            f"{where}: unknown setting {key!r} (known: {', '.join(SETTINGS)}, "
            f"and {REMOTE_ENV_PREFIX}NAME for variables exported on the workers)"
        )
    return key


def expand(value: str, scope: dict[str, str], where: str) -> str:
    """Replace ``${NAME}`` from ``scope``."""

    def one(m: re.Match) -> str:
        if m.group(1) not in scope:
            raise LaunchError(f"{where}: ${{{m.group(1)}}} is not set above")
        return scope[m.group(1)]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", one, value)


@dataclass
class Settings:
    """The launch settings: env file values over defaults."""

    values: dict[str, str]

    @classmethod
    def load(cls, env_file: str | None, overrides: list[str] = ()) -> Settings:
        """Read ``env_file`` (if any) and apply ``KEY=VALUE`` overrides."""
        values = read_env_file(env_file) if env_file else {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise LaunchError(f"--set {item!r}: expected KEY=VALUE")
            values[check_key(key, "--set")] = expand(value, {**os.environ, **values}, "--set")
        return cls(values)

    def get(self, key: str) -> str:
        """A setting's value; a LaunchError if it is required and missing."""
        default = SETTINGS[key][0]
        value = self.values.get(key, "" if default is REQUIRED else default)
        if default is REQUIRED and not value:
            raise LaunchError(f"setting {key} is required ({SETTINGS[key][1]})")
        return value

    def flag(self, key: str) -> bool:
        """A true/false setting."""
        value = self.get(key).strip().lower()
        if value not in _TRUE | _FALSE:
            raise LaunchError(f"setting {key}: expected true or false, got {value!r}")
        return value in _TRUE

    def number(self, key: str) -> int:
        """A non-negative integer setting."""
        value = self.get(key)
        if not value.isdigit():
            raise LaunchError(f"setting {key}: expected a whole number, got {value!r}")
        return int(value)

    def words(self, key: str) -> list[str]:
        """A setting holding shell words."""
        try:
            return shlex.split(self.get(key))
        except ValueError as e:
            raise LaunchError(f"setting {key}: {e}") from None

    def remote_env(self) -> dict[str, str]:
        """Variables to export on the workers: REMOTE_ENV_* and PASS_ENV."""
        env = {"PYTHONUNBUFFERED": "1"}
        for key, value in sorted(self.values.items()):
            if key.startswith(REMOTE_ENV_PREFIX) and len(key) > len(REMOTE_ENV_PREFIX):
                env[key[len(REMOTE_ENV_PREFIX) :]] = value
        for name in self.words("PASS_ENV"):
            if name not in os.environ:
                raise LaunchError(f"PASS_ENV: {name} is not set in this shell")
            env[name] = os.environ[name]
        return env

    def runtime_version(self) -> str:
        """RUNTIME_VERSION, or the default for ACCELERATOR_TYPE's generation."""
        if self.get("RUNTIME_VERSION"):
            return self.get("RUNTIME_VERSION")
        generation = self.get("ACCELERATOR_TYPE").rsplit("-", 1)[0]
        generation = {"v5e": "v5litepod"}.get(generation, generation)
        if generation not in RUNTIME_VERSIONS:
            raise LaunchError(
                f"ACCELERATOR_TYPE {self.get('ACCELERATOR_TYPE')!r}: unknown generation; "
                "set RUNTIME_VERSION"
            )
        return RUNTIME_VERSIONS[generation]

    def output_dir(self) -> str:
        """OUTPUT_DIR (needed to find the merged model by default)."""
        return self.get("OUTPUT_DIR").rstrip("/")


# --------------------------------------------------------------------------
# gcloud commands (pure: settings in, argv out)
# --------------------------------------------------------------------------

REMOTE_CONFIG = "config.yaml"  # the run config on the workers, in REMOTE_DIR
REMOTE_MERGE_CONFIG = "merge.yaml"
SOURCE_ARCHIVE = "dem-jax-src.tar.gz"  # a local source directory, packed


def slug(name: str) -> str:
    """A distribution name made safe for TPU names and file names."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not s:
        raise LaunchError(f"distribution {name!r}: no letters or digits to name a slice with")
    return s


def one_line(lines: list[str]) -> str:
    """Shell lines as one line (so each printed command is one line): joined by
    ``; ``, or by a space after ``then``, ``else``, ``do``, ``&``, ``&&``, ``||``, ``|``."""
    out = ""
    for line in (x.strip() for x in lines):
        if not out or not line:
            out = out or line
            continue
        keeps = re.search(r"(\bthen|\belse|\bdo|&|\||\{)$", out)
        out += (" " if keeps else "; ") + line
    return out


@dataclass(frozen=True)
class Tpu:
    """One TPU slice (a TPU VM, or a queued resource holding one) and its gcloud commands."""

    name: str
    settings: Settings = field(repr=False, compare=False)

    @property
    def queued(self) -> bool:
        return self.settings.flag("QUEUED")

    @property
    def queued_resource(self) -> str:
        """The queued resource's id (its node is ``name``)."""
        return f"{self.name}-qr"

    def _where(self) -> list[str]:
        s = self.settings
        return [f"--zone={s.get('ZONE')}", f"--project={s.get('PROJECT')}"]

    def create(self) -> list[str]:
        """Create the slice (or queue the request for it)."""
        s = self.settings
        spot, preemptible = s.flag("SPOT"), s.flag("PREEMPTIBLE")
        if spot and preemptible:
            raise LaunchError("SPOT and PREEMPTIBLE: choose one")
        accel = f"--accelerator-type={s.get('ACCELERATOR_TYPE')}"
        if self.queued:
            if preemptible:
                raise LaunchError("queued resources take SPOT=true, not PREEMPTIBLE")
            argv = ["gcloud", "compute", "tpus", "queued-resources", "create"]
            argv += [self.queued_resource, f"--node-id={self.name}", *self._where(), accel]
            argv += [f"--runtime-version={s.runtime_version()}"]
            if s.get("VALID_UNTIL_DURATION"):
                argv.append(f"--valid-until-duration={s.get('VALID_UNTIL_DURATION')}")
        else:
            if s.get("VALID_UNTIL_DURATION"):
                raise LaunchError("VALID_UNTIL_DURATION needs QUEUED=true")
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where()]
            argv += [accel, f"--version={s.runtime_version()}"]
            argv += ["--preemptible"] if preemptible else []
        argv += ["--spot"] if spot else []
        return [*argv, *s.words("CREATE_FLAGS"), "--quiet"]

    def describe(self) -> list[str]:
        """Print the slice's (or its queued resource's) state as JSON."""
        if self.queued:
            argv = ["gcloud", "compute", "tpus", "queued-resources", "describe"]
            argv.append(self.queued_resource)
        else:
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name]
        return [*argv, *self._where(), "--format=json"]

    def delete(self) -> list[str]:
        """Delete the slice (a queued resource together with its node)."""
        if self.queued:
            argv = ["gcloud", "compute", "tpus", "queued-resources", "delete"]
            return [*argv, self.queued_resource, *self._where(), "--force", "--quiet"]
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name]
        return [*argv, *self._where(), "--quiet"]

    def ssh(self, script: list[str]) -> list[str]:
        """Run bash script lines on every worker at once."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where()]
        command = f"bash -c {shlex.quote(one_line(script))}"
        return [*argv, "--worker=all", f"--command={command}", "--quiet"]

    def scp_to(self, local: str, remote: str) -> list[str]:
        """Copy a local file to ``remote`` (relative to the home directory) on every worker."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}"]
        return [*argv, *self._where(), "--worker=all", "--quiet"]

    def scp_from(self, remote: str, local: str) -> list[str]:
        """Copy a remote directory from every worker to ``local``."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
        argv += [f"{self.name}:{remote}", local]
        return [*argv, *self._where(), "--worker=all", "--quiet"]


# --------------------------------------------------------------------------
# Scripts run on the workers
# --------------------------------------------------------------------------


def _prelude(s: Settings, env: bool = True) -> list[str]:
    """Enter REMOTE_DIR and the venv; export the pass-through environment."""
    lines = ["set -euo pipefail", f"cd {shlex.quote(s.get('REMOTE_DIR'))}"]
    if env:
        lines.append('export VIRTUAL_ENV="$PWD/venv" PATH="$PWD/venv/bin:$PATH"')
        lines += [f"export {k}={shlex.quote(v)}" for k, v in s.remote_env().items()]
    return lines


def source_kind(source: str) -> str:
    """``"dir"``, ``"file"`` (a wheel or sdist here) or ``"requirement"`` (for pip)."""
    if Path(source).is_dir():
        return "dir"
    if Path(source).is_file():
        return "file"
    if re.search(r"\.(whl|tar\.gz|zip)$", source) and "://" not in source:
        raise LaunchError(f"DEM_JAX_SOURCE: {source}: no such file")
    return "requirement"


def setup_script(s: Settings) -> list[str]:
    """First step on a fresh worker: working directory, Python and a venv."""
    version, installer = s.get("PYTHON_VERSION"), s.get("INSTALLER")
    lines = [
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(s.get('REMOTE_DIR'))}/dist",
        f"cd {shlex.quote(s.get('REMOTE_DIR'))}",
    ]
    if installer == "uv":
        lines += [
            'export PATH="$HOME/.local/bin:$PATH"',
            "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
            f"[ -x venv/bin/python ] || uv venv --python {shlex.quote(version)} venv",
        ]
    elif installer == "pip":
        python = shlex.quote(f"python{version}")
        lines += [f"[ -x venv/bin/python ] || {python} -m venv venv", "venv/bin/pip install -U pip"]
    else:
        raise LaunchError(f"INSTALLER: expected uv or pip, got {installer!r}")
    return lines


def install_script(s: Settings, reinstall: bool = False) -> list[str]:
    """Install JAX for TPUs and dem-jax into the venv (``reinstall``: dem-jax again)."""
    source = s.get("DEM_JAX_SOURCE")
    kind = source_kind(source)
    lines = _prelude(s, env=False)
    if kind == "dir":
        lines += ["rm -rf src && mkdir src", f"tar -xzf dist/{SOURCE_ARCHIVE} -C src"]
        target = "./src"
    else:
        target = f"dist/{Path(source).name}" if kind == "file" else source
    packages = [s.get("JAX_REQUIREMENT"), target]
    if s.get("INSTALLER") == "uv":
        lines.append('export PATH="$HOME/.local/bin:$PATH"')
        again = ["--reinstall-package", "dem-jax"] if reinstall else []
        pip = ["uv", "pip", "install", "--python", "venv/bin/python", *again]
    else:
        pip = [
            "venv/bin/pip",
            "install",
            *(["--force-reinstall", "--no-deps"] if reinstall else []),
        ]
    lines.append(shlex.join([*pip, *packages]))
    lines.append('venv/bin/dem-jax --help >/dev/null && echo "dem-jax ready on $(hostname)"')
    return lines


def job_script(s: Settings, job: str, command: list[str], pre: list[str] = ()) -> list[str]:
    """Start ``command`` detached on each worker (or re-attach to it if it is still
    running), follow its log, and exit with its exit status. ``pre``: shell lines
    run first, in the foreground."""
    # The detached wrapper gets the command's words as "$@". It traps SIGTERM (a
    # `stop`, or the VM shutting down) so that it outlives the command, which gets
    # the signal too (dem-jax train checkpoints), and records its exit status.
    detached = """'trap true TERM; "$@"; echo $? >"$DEM_TPU_RC"'"""
    return [
        *_prelude(s),
        'host="$(hostname)"',
        'mkdir -p "logs/$host"',
        f'pidfile="logs/$host/{job}.pid" rcfile="logs/$host/{job}.rc"',
        f'logfile="logs/$host/{job}.log"',
        'if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then',
        '  pid="$(cat "$pidfile")"',
        f'  echo "dem-tpu: {job} is already running on $host; following it"',
        '  tail -n 20 --pid="$pid" -f "$logfile"',
        "else",
        '  rm -f "$rcfile"',
        '  offset="$(stat -c %s "$logfile" 2>/dev/null || echo 0)"',
        *[f"  {line}" for line in pre],
        f"  set -- {shlex.join(command)}",
        '  echo "=== $(date -u +%FT%TZ) $*" >>"$logfile"',
        f'  DEM_TPU_RC="$rcfile" setsid nohup bash -c {detached} {job} "$@"'
        ' >>"$logfile" 2>&1 </dev/null &',
        "  pid=$!",
        '  echo "$pid" >"$pidfile"',
        '  tail -c +"$((offset + 1))" --pid="$pid" -f "$logfile"',
        "fi",
        'if [ -f "$rcfile" ]; then exit "$(cat "$rcfile")"; fi',
        f'echo "dem-tpu: {job} on $host ended without an exit status" >&2',
        "exit 1",
    ]


def exec_script(s: Settings, command: list[str]) -> list[str]:
    """Run a command in the venv on each worker, in the foreground."""
    return [*_prelude(s), shlex.join(command)]


def stop_script(s: Settings, job: str) -> list[str]:
    """SIGTERM a detached job's process group (dem-jax train checkpoints, then exits)."""
    return [
        *_prelude(s, env=False),
        f'pidfile="logs/$(hostname)/{job}.pid"',
        'if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then',
        '  kill -TERM -- "-$(cat "$pidfile")"',
        f'  echo "dem-tpu: sent SIGTERM to {job} on $(hostname)"',
        "else",
        f'  echo "dem-tpu: {job} is not running on $(hostname)"',
        "fi",
    ]


# --------------------------------------------------------------------------
# dem-jax commands
# --------------------------------------------------------------------------


def _output_override(s: Settings) -> list[str]:
    return [f"output_dir={s.output_dir()}"] if s.output_dir() else []


def train_jobs(s: Settings, names: list[str] | None = None, mixture: bool | None = None):
    """(job name, slice suffix, dem-jax argv) for each training run."""
    names = names or s.words("DISTRIBUTIONS")
    if not names:
        raise LaunchError("setting DISTRIBUTIONS is empty")
    extra = [*_output_override(s), *s.words("TRAIN_OVERRIDES")]
    jobs = []
    for name in names:
        argv = ["dem-jax", "train", REMOTE_CONFIG, "--distribution", name, *extra]
        jobs.append((f"train-{slug(name)}", slug(name), argv))
    if s.flag("MIXTURE") if mixture is None else mixture:
        argv = ["dem-jax", "train", REMOTE_CONFIG, "--mixture", *extra]
        jobs.append(("train-mixture", "mixture", argv))
    suffixes = [j[1] for j in jobs]
    dupes = sorted({x for x in suffixes if suffixes.count(x) > 1})
    if dupes:
        raise LaunchError(f"DISTRIBUTIONS: names collide once made slice-safe: {', '.join(dupes)}")
    return jobs


def search_argv(s: Settings) -> list[str]:
    """Choose merge weights and write the merged model (output_dir/models/dem)."""
    return ["dem-jax", "search", REMOTE_CONFIG, *_output_override(s), *s.words("SEARCH_OVERRIDES")]


def _under_output(s: Settings, key: str, default: str) -> str:
    """Setting ``key``, else OUTPUT_DIR/``default``."""
    if s.get(key):
        return s.get(key)
    if not s.output_dir():
        raise LaunchError(f"set OUTPUT_DIR (or {key})")
    return f"{s.output_dir()}/{default}"


def merge_job(s: Settings) -> tuple[list[str], list[str]]:
    """(shell lines run first, dem-jax merge argv) for MERGE_CONFIG."""
    merge = s.get("MERGE_CONFIG")
    pre = []
    if merge.startswith("gs://"):
        pre = [shlex.join(["gcloud", "storage", "cp", merge, REMOTE_MERGE_CONFIG])]
    out = _under_output(s, "MERGE_OUT", "models/merge-hf")
    argv = ["dem-jax", "merge", REMOTE_MERGE_CONFIG, "--out", out, "--format", "hf"]
    return pre, [*argv, "--mesh", s.get("MESH"), "--overwrite"]


def export_argv(s: Settings) -> list[str]:
    """Convert the DEM model that `search` wrote to Hugging Face format."""
    src = _under_output(s, "MERGED_DIR", "models/dem")
    dst = _under_output(s, "HF_DIR", "models/dem-hf")
    return ["dem-jax", "convert", "orbax-to-hf", src, dst, "--mesh", s.get("MESH"), "--overwrite"]


# --------------------------------------------------------------------------
# Running commands (for real, or printing them)
# --------------------------------------------------------------------------


@dataclass
class Result:
    """What a command returned."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner:
    """Runs commands for real; progress goes to stderr, command output passes through."""

    dry = False

    def __init__(self):
        self._lock = threading.Lock()
        self.secrets: list[str] = []  # PASS_ENV values, masked in the progress log

    def log(self, message: str) -> None:
        with self._lock:
            print(f"dem-tpu: {message}", file=sys.stderr, flush=True)

    def run(self, argv: list[str], capture: bool = False) -> Result:
        """Run ``argv``; with ``capture`` return its output instead of showing it."""
        if not capture:
            self.log("+ " + self.mask(shlex.join(argv)))
        try:
            p = subprocess.run(argv, capture_output=capture, text=True, check=False)
        except FileNotFoundError:
            raise LaunchError(f"{argv[0]}: command not found") from None
        return Result(p.returncode, p.stdout or "", p.stderr or "")

    def mask(self, line: str) -> str:
        """``line`` with every secret replaced by ***, at any depth of single-quoting."""
        for secret in self.secrets:
            forms = [secret]
            for _ in range(4):  # each shlex.quote level turns ' into '"'"'
                forms.append(forms[-1].replace("'", "'\"'\"'"))
            for form in sorted(set(forms), key=len, reverse=True):
                line = line.replace(form, "***")
        return line

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DryRunner(Runner):
    """Prints each command on stdout instead of running it.

    ``describe`` answers NOT_FOUND for a slice until its ``create`` was
    printed, then READY (ACTIVE for a queued resource), so the printed sequence
    is that of a fresh start.
    """

    dry = True

    def __init__(self, out=None):
        super().__init__()
        self.out = out or sys.stdout
        self.created: set[str] = set()

    def run(self, argv: list[str], capture: bool = False) -> Result:
        with self._lock:
            print(shlex.join(argv), file=self.out, flush=True)
        if argv[:3] != ["gcloud", "compute", "tpus"] or len(argv) < 6:
            return Result(0)
        verb, name = argv[4], argv[5]
        if verb == "create":
            self.created.add(name)
        elif verb == "delete":
            self.created.discard(name)
        elif verb == "describe":
            if name not in self.created:
                return Result(1, "", f"ERROR: NOT_FOUND: {name} was not found")
            queued = argv[3] == "queued-resources"
            state = {"state": "ACTIVE"} if queued else "READY"
            return Result(0, json.dumps({"state": state}))
        return Result(0)

    def sleep(self, seconds: float) -> None:
        pass


# --------------------------------------------------------------------------
# Slice state and the restart loop
# --------------------------------------------------------------------------

NOT_FOUND, UNREACHABLE = "NOT_FOUND", "UNREACHABLE"
READY_STATES = {"READY", "ACTIVE"}
# Gone for good: delete and create again (preempted Spot VM; a queued resource
# whose Spot node was reclaimed is SUSPENDING/SUSPENDED; FAILED requests).
LOST_STATES = {"PREEMPTED", "TERMINATED", "SUSPENDING", "SUSPENDED", "FAILED", "STOPPED"}
LOST_STATES |= {"STOPPING", "HIDING", "HIDDEN", "UNKNOWN"}


def parse_state(result: Result, queued: bool) -> str:
    """The state in a ``describe --format=json`` result; NOT_FOUND when there is no
    such slice, UNREACHABLE when gcloud failed otherwise."""
    if result.returncode != 0:
        text = result.stderr.lower()
        return NOT_FOUND if "not_found" in text or "not found" in text else UNREACHABLE
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        return UNREACHABLE
    state = data.get("state")
    if queued and isinstance(state, dict):
        state = state.get("state")
    return state if isinstance(state, str) and state else UNREACHABLE


def next_action(state: str) -> str:
    """What the restart loop does in a state: create, recreate (delete it first),
    run, or wait (creating, queued, deleting, or gcloud unreachable)."""
    if state == NOT_FOUND:
        return "create"
    if state in READY_STATES:
        return "run"
    if state in LOST_STATES:
        return "recreate"
    return "wait"


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


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Subcommands, each with --env, --set and --dry-run."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env", metavar="FILE", help="settings file (KEY=VALUE lines)")
    common.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    common.add_argument(
        "--dry-run", action="store_true", help="print the commands, one per line; run nothing"
    )
    parser = argparse.ArgumentParser(
        prog="dem_tpu.py",
        description="DEM on Cloud TPU VMs. Settings: --env FILE (see dem-tpu.env.example).",
        epilog="settings:\n"
        + "\n".join(f"  {k:<22}{h}" for k, (_, h) in SETTINGS.items())
        + f"\n  {REMOTE_ENV_PREFIX + 'NAME':<22}export NAME on the workers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    add("create", "create the TPU VM (or queued resource) and wait until it is ready")
    add("install", "set up Python and install JAX + dem-jax on every worker; copy CONFIG")
    add("sync", "copy CONFIG and the dem-jax source again and reinstall dem-jax")
    p = add(
        "exec", "run a command in the dem-jax venv on every worker, e.g. exec -- dem-jax --help"
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    p = add("train", "train every distribution (restarting preempted slices)")
    p.add_argument("--distribution", action="append", help="only this one (repeatable)")
    p.add_argument("--parallel", action="store_true", default=None, help="one slice each")
    p.add_argument("--sequential", dest="parallel", action="store_false", help="all on TPU_NAME")
    p.add_argument("--mixture", action="store_true", default=None, help="also the mixture")
    p.add_argument("--keep", action="store_true", help="keep per-distribution slices after")
    add("search", "choose merge weights by validation perplexity; write the merged model")
    add("merge", "run the mergekit-style MERGE_CONFIG; write MERGE_OUT (Hugging Face format)")
    add("export", "convert the DEM model (MERGED_DIR) to Hugging Face format in HF_DIR")
    add("logs", "copy every worker's logs to LOG_DIR")
    add("status", "print the slice's state")
    p = add("stop", "SIGTERM a running job on every worker (train checkpoints first)")
    p.add_argument("job", help="job name, e.g. train-cot, search")
    p = add("delete", "delete TPU_NAME (and the per-distribution slices with PARALLEL)")
    p = add("pipeline", "train all, search, merge, export, fetch logs (delete if DELETE_AFTER)")
    p.add_argument("--delete", action="store_true", default=None, help="delete slices at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load(args.env, args.set)
        runner = DryRunner() if args.dry_run else Runner()
        runner.secrets = [os.environ[n] for n in settings.words("PASS_ENV") if os.environ.get(n)]
        return dispatch(Launcher(settings, runner), args)
    except LaunchError as e:
        print(f"dem_tpu.py: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. a dry run piped into `head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (nothing more to flush at exit)
        return 1
    except KeyboardInterrupt:
        print(
            "dem_tpu.py: interrupted (detached jobs keep running on the workers)", file=sys.stderr
        )
        return 130


def preflight(s: Settings, cmd: str) -> None:
    """Check every setting a command will need before it creates or runs anything."""
    tpu = Tpu(s.get("TPU_NAME"), s)
    tpu.describe()
    if cmd in ("create", "train", "search", "merge", "export", "pipeline"):
        tpu.create()
    if cmd in ("install", "sync", "train", "search", "merge", "export", "pipeline"):
        setup_script(s), install_script(s)
        if not Path(s.get("CONFIG")).is_file():
            raise LaunchError(f"CONFIG: {s.get('CONFIG')}: no such file")
    if cmd in ("exec", "train", "search", "merge", "export", "pipeline"):
        s.remote_env()
    if cmd in ("train", "pipeline") or (cmd == "delete" and s.flag("PARALLEL")):
        train_jobs(s)
    if cmd in ("export", "pipeline"):
        export_argv(s)
    if cmd == "merge" or (cmd == "pipeline" and s.get("MERGE_CONFIG")):
        merge_job(s)


def dispatch(launcher: Launcher, args: argparse.Namespace) -> int:
    """Carry out one subcommand."""
    s, tpu, cmd = launcher.settings, launcher.tpu(), args.command
    preflight(s, cmd)
    if cmd == "create":
        launcher.create(tpu)
    elif cmd == "install":
        launcher.install(tpu)
    elif cmd == "sync":
        launcher.sync(tpu)
    elif cmd == "exec":
        words = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not words:
            raise LaunchError("exec: give a command, e.g. exec -- dem-jax --help")
        return launcher.runner.run(tpu.ssh(exec_script(s, words))).returncode
    elif cmd == "train":
        return launcher.train(args.distribution, args.parallel, args.mixture, args.keep)
    elif cmd == "search":
        return launcher.babysit(tpu, "search", search_argv(s))
    elif cmd == "merge":
        if not s.get("MERGE_CONFIG"):
            raise LaunchError("merge: set MERGE_CONFIG (a mergekit-style YAML)")
        pre, argv = merge_job(s)
        return launcher.babysit(tpu, "merge", argv, pre)
    elif cmd == "export":
        return launcher.babysit(tpu, "export", export_argv(s))
    elif cmd == "logs":
        launcher.fetch_logs(tpu)
    elif cmd == "status":
        state = launcher.state(tpu)
        if not launcher.dry:  # a dry run prints commands only
            print(f"{tpu.name}: {state}")
    elif cmd == "stop":
        return launcher.runner.run(tpu.ssh(stop_script(s, args.job))).returncode
    elif cmd == "delete":
        launcher.delete_all()
    elif cmd == "pipeline":
        return launcher.pipeline(args.delete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
