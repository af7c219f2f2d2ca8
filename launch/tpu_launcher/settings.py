"""The launch settings: the table of known keys, env file parsing and typed access."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import LaunchError

# name: (default, help). Keys are checked: a typo in the env file is an error.
SETTINGS: dict[str, tuple[str, str]] = {
    "PROJECT": ("", "Google Cloud project id"),
    "ZONE": ("", "zone of the TPUs, e.g. us-central2-b"),
    "TPU_NAME": ("", "TPU VM name; per-distribution slices are TPU_NAME-DIST"),
    "ACCELERATOR_TYPE": ("", "slice type: v4-8, v5litepod-16, v5p-32, v6e-8, ..."),
    "RUNTIME_VERSION": ("", "TPU software version (default: the one for the generation)"),
    "SPOT": ("false", "true: Spot VMs (preemptible at any time, cheaper)"),
    "PREEMPTIBLE": ("false", "true: legacy preemptible TPU (not with QUEUED)"),
    "QUEUED": ("false", "true: ask through a queued resource and wait in line for capacity"),
    "VALID_UNTIL_DURATION": ("", "queued: drop the request if unfilled after this, e.g. 6h"),
    "CREATE_FLAGS": ("", "extra create flags, shell words, e.g. --network=my-net"),
    "BUCKET": ("", "gs://bucket, usable as ${BUCKET} in other values"),
    "CONFIG": ("", "run config YAML on this machine; copied to every worker"),
    "OUTPUT_DIR": ("", "if set, passed as output_dir=... to every dem-jax run (gs://...)"),
    "DISTRIBUTIONS": ("", "space-separated names from the config's data.distributions"),
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
        "",
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
# Settings without a default: `Settings.get` refuses to return one of them empty.
REQUIRED = frozenset(
    {"PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "CONFIG", "DISTRIBUTIONS", "DEM_JAX_SOURCE"}
)
REMOTE_ENV_PREFIX = "REMOTE_ENV_"  # REMOTE_ENV_XLA_FLAGS=... exports XLA_FLAGS on the workers

# Settings that name things on the workers: a value must match in full. scp hands remote
# paths to the worker's shell, and the slice name is the host part of every scp target,
# so neither may hold anything a shell or scp reads as syntax.
PATTERNS: dict[str, tuple[str, str]] = {
    "TPU_NAME": (r"[a-z]([-a-z0-9]{0,60}[a-z0-9])?", "lowercase letters, digits and '-'"),
    "REMOTE_DIR": (
        r"/?[A-Za-z0-9_.][A-Za-z0-9_./-]*",
        "a path of letters, digits and '_' '.' '/' '-' (no spaces or shell characters)",
    ),
}
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"  # a variable name the workers' shell can export

# Default TPU software version per generation (Cloud TPU docs, "TPU software
# versions"); must agree with TPU_GENERATIONS in dem_jax.plan (tests/test_launch.py).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


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
        value = self.values.get(key, SETTINGS[key][0])
        if key in REQUIRED and not value:
            raise LaunchError(f"setting {key} is required ({SETTINGS[key][1]})")
        if key in PATTERNS and value and not re.fullmatch(PATTERNS[key][0], value):
            raise LaunchError(f"setting {key}: {value!r} is not allowed ({PATTERNS[key][1]})")
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
            if not re.fullmatch(ENV_NAME, name):
                raise LaunchError(f"PASS_ENV: {name!r} is not a variable name")
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
