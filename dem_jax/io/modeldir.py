"""Model directories: what a loaded model is, which kind a path holds, and
writing a directory so that it is complete or absent.

Two kinds of directory are accepted wherever a model path is asked for:

* a Hugging Face directory: ``config.json`` + ``*.safetensors`` (one file, or
  shards with ``model.safetensors.index.json``);
* a dem-jax directory: ``dem_jax_model.json`` (the model config, and the
  Hugging Face config it came from, if any) + ``params/`` (Orbax).

Both may hold tokenizer files and ``generation_config.json``; they travel with
the weights through every conversion.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
from jax.experimental import multihost_utils

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage

DEM_METADATA = "dem_jax_model.json"
HF_CONFIG = "config.json"

# Files copied along with the weights: tokenizer and generation settings.
_ASSET_NAMES = {
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
}


@dataclass
class Model:
    """A model in memory: its config, its parameters and where its assets live."""

    config: ModelConfig
    params: dict[str, Any]  # nested dict of jax.Arrays, laid out as dem_jax.model builds it
    hf_config: dict[str, Any] | None = None  # the config.json the weights came from
    assets_dir: Any = None  # local Path or URL path; directory holding tokenizer/generation files
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form provenance


def model_format(path: str | os.PathLike) -> str:
    """``"hf"`` or ``"orbax"`` for a model directory; DemError if it is neither."""
    p = storage.path(path)
    if not p.exists():
        raise DemError(f"{p}: model path does not exist")
    if not p.is_dir():
        raise DemError(f"{p}: model path is not a directory")
    storage.check_complete(p)
    if (p / DEM_METADATA).is_file():
        return "orbax"
    if (p / HF_CONFIG).is_file():
        return "hf"
    raise DemError(
        f"{p}: not a model directory (expected config.json + *.safetensors for Hugging Face, "
        f"or {DEM_METADATA} + params/ for dem-jax)"
    )


def asset_files(directory: str | os.PathLike | None) -> list[Any]:
    """Tokenizer and generation-config files in a directory."""
    if directory is None:
        return []
    return sorted(
        f
        for f in storage.path(directory).iterdir()
        if f.is_file() and (f.name in _ASSET_NAMES or f.name.startswith("tokenizer"))
    )


def copy_assets(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer/generation files from ``src`` into ``dst``; returns the names."""
    names = []
    for f in asset_files(src):
        storage.copy_file(f, storage.path(dst) / f.name)
        names.append(f.name)
    return names


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Any]:
    """Yield a temporary sibling of ``dst`` to fill; move it to ``dst`` on success.

    On any error the temporary directory is removed and ``dst`` is untouched,
    so readers see either the complete output or nothing new. With
    ``overwrite`` an existing ``dst`` is replaced only after the new one is
    complete. With several JAX processes every process must enter (Orbax
    saves are collective); the temporary name is shared and process 0 alone
    creates and moves it.

    Local directories are renamed (atomic). Object stores (``gs://``) have no
    rename: the move copies object by object with an incomplete marker in
    ``dst`` that :func:`dem_jax.io.storage.check_complete` refuses, removed last.
    """
    dst = storage.path(dst)
    if dst.exists() and not overwrite:
        raise DemError(f"{dst}: output already exists (pass --overwrite to replace it)")
    if not storage.parent_exists(dst):
        raise DemError(f"{dst.parent}: output's parent directory does not exist")
    multi = jax.process_count() > 1
    main = jax.process_index() == 0
    suffix = "dist" if multi else uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{suffix}"
    if main:
        # Leftovers of a killed earlier write of the same output are never used.
        for stale in dst.parent.glob(f".{dst.name}.tmp-*"):
            storage.rmtree(stale)
        storage.makedirs(tmp)
    _barrier(multi, f"atomic_directory:create:{dst}")
    try:
        yield tmp
        _barrier(multi, f"atomic_directory:filled:{dst}")
        if main:
            _move_into_place(tmp, dst)
        _barrier(multi, f"atomic_directory:renamed:{dst}")
    except BaseException:
        if main:
            storage.rmtree(tmp)
        raise


def _move_into_place(tmp: Any, dst: Any) -> None:
    if not storage.is_url(dst):
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
        return
    marker = dst / storage.INCOMPLETE_MARKER
    marker.write_text("moving into place\n")
    for f in dst.iterdir():  # --overwrite: the old content goes once the new is complete
        if f.name != storage.INCOMPLETE_MARKER:
            f.rmtree() if f.is_dir() else f.unlink()
    for f in tmp.iterdir():
        storage.replace(f, dst / f.name)
    marker.unlink()
    storage.rmtree(tmp)


def _barrier(multi: bool, name: str) -> None:
    if multi:
        multihost_utils.sync_global_devices(name)
