"""The bash scripts run on every worker, and the file names they use there.

Set up Python and a venv, install JAX and dem-jax, start a job detached (or follow
the running one), run a command, stop a job. Paths are relative to REMOTE_DIR.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .errors import LaunchError
from .settings import Settings

REMOTE_CONFIG = "config.yaml"  # the run config on the workers, in REMOTE_DIR
REMOTE_MERGE_CONFIG = "merge.yaml"
SOURCE_ARCHIVE = "dem-jax-src.tar.gz"  # a local source directory, packed
JOB_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # names the job's log, pid and rc files


def check_job_name(job: str) -> str:
    """``job`` if it is a job name (letters, digits, '_', '.', '-'), else a LaunchError:
    it becomes file names and text in the workers' scripts."""
    if not re.fullmatch(JOB_NAME, job):
        raise LaunchError(
            f"job name {job!r}: expected letters, digits, '_', '.' or '-' "
            "(at most 63, starting with a letter or digit), e.g. train-cot or search"
        )
    return job


def _dq(value: str) -> str:
    """``value`` escaped for the inside of a double-quoted shell string."""
    return re.sub(r'([\\"$`])', r"\\\1", value)


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
        # Copied to REMOTE_DIR/dist/NAME with scp, which hands the path to a shell there.
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", Path(source).name):
            raise LaunchError(
                f"DEM_JAX_SOURCE: {source}: the file name may hold only letters, digits "
                "and '_' '.' '+' '-'"
            )
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
    q = _dq(check_job_name(job))
    return [
        *_prelude(s),
        'host="$(hostname)"',
        'mkdir -p "logs/$host"',
        f'pidfile="logs/$host/{q}.pid" rcfile="logs/$host/{q}.rc"',
        f'logfile="logs/$host/{q}.log"',
        'if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then',
        '  pid="$(cat "$pidfile")"',
        f'  echo "dem-tpu: {q} is already running on $host; following it"',
        '  tail -n 20 --pid="$pid" -f "$logfile"',
        "else",
        '  rm -f "$rcfile"',
        '  offset="$(stat -c %s "$logfile" 2>/dev/null || echo 0)"',
        *[f"  {line}" for line in pre],
        f"  set -- {shlex.join(command)}",
        '  echo "=== $(date -u +%FT%TZ) $*" >>"$logfile"',
        f'  DEM_TPU_RC="$rcfile" setsid nohup bash -c {detached} {shlex.quote(job)} "$@"'
        ' >>"$logfile" 2>&1 </dev/null &',
        "  pid=$!",
        '  echo "$pid" >"$pidfile"',
        '  tail -c +"$((offset + 1))" --pid="$pid" -f "$logfile"',
        "fi",
        'if [ -f "$rcfile" ]; then exit "$(cat "$rcfile")"; fi',
        f'echo "dem-tpu: {q} on $host ended without an exit status" >&2',
        "exit 1",
    ]


def exec_script(s: Settings, command: list[str]) -> list[str]:
    """Run a command in the venv on each worker, in the foreground."""
    return [*_prelude(s), shlex.join(command)]


def stop_script(s: Settings, job: str) -> list[str]:
    """SIGTERM a detached job's process group (dem-jax train checkpoints, then exits)."""
    q = _dq(check_job_name(job))
    return [
        *_prelude(s, env=False),
        f'pidfile="logs/$(hostname)/{q}.pid"',
        'if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then',
        '  kill -TERM -- "-$(cat "$pidfile")"',
        f'  echo "dem-tpu: sent SIGTERM to {q} on $(hostname)"',
        "else",
        f'  echo "dem-tpu: {q} is not running on $(hostname)"',
        "fi",
    ]
