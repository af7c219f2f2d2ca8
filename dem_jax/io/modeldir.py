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

import os
from dataclasses import dataclass, field
from typing import Any

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import outputs, storage

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
    if not p.exists() and not storage.is_url(p):
        outputs.recover(p)  # a killed --overwrite of p is finished or undone first
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
