"""Vector directories: Orbax ``params/`` plus ``dem_jax_vector.json`` (the model config
and the base and fine-tuned paths), written atomically.

    save_vector(vec, "out/vectors/code")
    vec = load_vector("out/vectors/code", mesh=mesh)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError, first_line
from dem_jax.io import storage
from dem_jax.io.orbax import read_format_json
from dem_jax.io.outputs import atomic_directory
from dem_jax.model.transformer import param_shapes
from dem_jax.sharding.rules import param_shardings
from dem_jax.vectors.vector import Vector

VECTOR_METADATA = "dem_jax_vector.json"
FORMAT_NAME = "dem-jax-vector"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


def is_vector_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dem-jax vector directory."""
    return (storage.path(path) / VECTOR_METADATA).is_file()


def save_vector(vector: Vector, out: str | os.PathLike, overwrite: bool = False) -> storage.AnyPath:
    """Write ``vector`` as a dem-jax vector directory, atomically (complete or absent)."""
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": vector.name,
        "base": vector.base_path,
        "finetuned": vector.model_path,
        "model": vector.config.replace(param_dtype="float32").to_dict(),
        "metadata": vector.metadata,
    }
    with atomic_directory(out, overwrite, (VECTOR_METADATA,)) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(storage.absolute(tmp / PARAMS_DIR), vector.params)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:  # every process saved its shards; one writes the rest
            (tmp / VECTOR_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return storage.path(out)


def read_vector_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated ``dem_jax_vector.json`` of a vector directory."""
    directory = storage.path(directory)
    if not directory.is_dir():
        raise DemError(f"{directory}: vector directory does not exist")
    storage.check_complete(directory)
    return read_format_json(directory / VECTOR_METADATA, FORMAT_NAME, FORMAT_VERSION)


def vector_config(directory: str | os.PathLike) -> ModelConfig:
    """The model config stored with a vector directory."""
    meta = read_vector_metadata(directory)
    return ModelConfig.from_dict(
        meta["model"], where=str(storage.path(directory) / VECTOR_METADATA)
    )


def load_vector(directory: str | os.PathLike, mesh: Mesh | None = None) -> Vector:
    """Restore a vector directory onto ``mesh`` (or the default device)."""
    directory = storage.path(directory)
    meta = read_vector_metadata(directory)
    config = vector_config(directory)
    params_dir = storage.absolute(directory / PARAMS_DIR)
    if not params_dir.is_dir():
        raise DemError(f"{params_dir}: missing parameter checkpoint")
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        param_shapes(config),
        param_shardings(config, mesh),
    )
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # Orbax raises many types for unreadable or misshaped checkpoints
        raise DemError(f"{params_dir}: cannot restore vector ({first_line(e)})") from None
    return Vector(
        config,
        params,
        name=meta.get("name"),
        base_path=meta.get("base"),
        model_path=meta.get("finetuned"),
        metadata=meta.get("metadata") or {},
    )
