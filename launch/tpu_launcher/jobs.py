"""The dem-jax command line of each job.

One training run per distribution (and the mixture), then search, merge and export.
"""

from __future__ import annotations

import re
import shlex

from .errors import LaunchError
from .settings import Settings
from .worker_scripts import REMOTE_CONFIG, REMOTE_MERGE_CONFIG


def slug(name: str) -> str:
    """A distribution name made safe for TPU names and file names."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not s:
        raise LaunchError(f"distribution {name!r}: no letters or digits to name a slice with")
    return s


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
