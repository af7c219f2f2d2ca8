"""Getting a :class:`~dem_jax.io.modeldir.Model`: load either kind of model directory,
save one, or initialise one at random directly on its shardings."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
from jax.sharding import Mesh

from dem_jax.config.model import ModelConfig
from dem_jax.io import storage
from dem_jax.io.hf.checkpoint import DEFAULT_MAX_SHARD_BYTES, load_hf, save_hf
from dem_jax.io.hf.config import from_hf_config
from dem_jax.io.modeldir import DEM_METADATA, HF_CONFIG, Model, model_format
from dem_jax.io.orbax import load_orbax, read_metadata, save_orbax
from dem_jax.model import transformer as model_lib
from dem_jax.sharding.rules import param_shardings

FORMATS = ("hf", "orbax")


def load_model(
    path: str | os.PathLike, mesh: Mesh | None = None, dtype: str | None = None
) -> Model:
    """Load a Hugging Face or dem-jax model directory (detected automatically).

    With ``mesh`` every parameter is placed on its shard as it is read; without,
    on the default device. ``dtype`` casts the parameters (default: as stored).
    """
    if model_format(path) == "hf":
        return load_hf(path, mesh=mesh, dtype=dtype)
    return load_orbax(path, mesh=mesh, dtype=dtype)


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a Hugging Face or dem-jax model directory, read without its weights
    (to check inputs against the model before any work)."""
    p = storage.path(path)
    if model_format(p) == "hf":
        return from_hf_config(storage.read_json(p / HF_CONFIG), str(p / HF_CONFIG))
    return ModelConfig.from_dict(read_metadata(p)["model"], where=str(p / DEM_METADATA))


def save_model(
    model: Model,
    out: str | os.PathLike,
    format: str = "orbax",
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``out`` as ``"orbax"`` (dem-jax) or ``"hf"``; complete or absent."""
    if format == "hf":
        return save_hf(
            model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite
        )
    if format == "orbax":
        return save_orbax(model, out, dtype=dtype, overwrite=overwrite)
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def init_model(config: ModelConfig, seed: int = 0, mesh: Mesh | None = None) -> Model:
    """A randomly initialised model, created directly on its shardings."""
    return Model(config, _initializer(config, mesh)(seed))


@functools.lru_cache(maxsize=16)
def _initializer(config: ModelConfig, mesh: Mesh | None):
    """One compiled initialiser per (config, mesh), shared by every seed."""
    return jax.jit(
        functools.partial(model_lib.init_params, config),
        out_shardings=param_shardings(config, mesh),
    )
