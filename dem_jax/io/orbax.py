"""dem-jax model directories: Orbax parameters + model config + assets.

Parameters are saved with their shardings' metadata and restored straight
onto the shardings asked for, so a model never has to fit on one host.
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
from dem_jax.io.assets import write_model_card
from dem_jax.io.modeldir import DEM_METADATA, Model, copy_assets
from dem_jax.io.outputs import atomic_directory
from dem_jax.io.storage import read_json
from dem_jax.model.transformer import param_shapes
from dem_jax.sharding.rules import param_shardings

FORMAT_NAME = "dem-jax-model"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


def save_orbax(
    model: Model, out: str | os.PathLike, dtype: str | None = None, overwrite: bool = False
) -> storage.AnyPath:
    """Write ``model`` as a dem-jax directory (parameters, config, tokenizer files and a
    model card), atomically."""
    params, config = model.params, model.config
    if dtype is not None and dtype != config.param_dtype:
        config = config.replace(param_dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": config.to_dict(),
        "hf_config": model.hf_config,
        "metadata": model.metadata,
    }
    with atomic_directory(out, overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(storage.absolute(tmp / PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:  # every process saved its shards; one writes the rest
            (tmp / DEM_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
            copy_assets(model.assets_dir, tmp)
            write_model_card(tmp, model.metadata, model.assets_dir, "orbax")
    return storage.path(out)


def read_format_json(path: storage.AnyPath, format_name: str, version: int) -> dict[str, Any]:
    """A dem-jax metadata file (model or vector directory), checked for its format
    name, version and model config."""
    meta = read_json(path)
    if meta.get("format") != format_name:
        raise DemError(f"{path}: format is {meta.get('format')!r}, expected {format_name!r}")
    if meta.get("version") != version:
        raise DemError(f"{path}: unsupported version {meta.get('version')!r}")
    if not isinstance(meta.get("model"), dict):
        raise DemError(f"{path}: missing the 'model' config")
    return meta


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``dem_jax_model.json`` of a dem-jax directory, validated."""
    return read_format_json(storage.path(directory) / DEM_METADATA, FORMAT_NAME, FORMAT_VERSION)


def load_orbax(directory: str | os.PathLike, mesh: Mesh | None = None, dtype: str | None = None):
    """Restore a dem-jax directory onto ``mesh`` (or the default device)."""
    directory = storage.path(directory)
    storage.check_complete(directory)
    meta = read_metadata(directory)
    config = ModelConfig.from_dict(meta["model"], where=str(directory / DEM_METADATA))
    params_dir = storage.absolute(directory / PARAMS_DIR)
    if not params_dir.is_dir():
        raise DemError(f"{params_dir}: missing parameter checkpoint")
    _check_stored_shapes(params_dir, param_shapes(config))
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        param_shapes(config),
        param_shardings(config, mesh),
    )
    params = ocp.StandardCheckpointer().restore(params_dir, target)
    model = Model(config, params, meta.get("hf_config"), directory, meta.get("metadata") or {})
    if dtype is not None and dtype != config.param_dtype:
        model.config = config.replace(param_dtype=dtype)
        model.params = jax.tree.map(lambda x: x.astype(dtype), params)
    return model


def _check_stored_shapes(params_dir: storage.AnyPath, expected: dict[str, Any]) -> None:
    """Compare the checkpoint's array metadata with the config before restoring, so a
    mismatch is one clear message rather than an error deep inside Orbax."""
    try:
        stored = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
    except Exception as e:  # Orbax raises many types for unreadable checkpoints
        raise DemError(f"{params_dir}: unreadable Orbax checkpoint ({first_line(e)})") from None
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(
            stored, is_leaf=lambda x: hasattr(x, "shape")
        )
    }
    for key in sorted(want.keys() | have.keys()):
        if key not in have:
            raise DemError(f"{params_dir}: missing parameter {key}")
        if key not in want:
            raise DemError(f"{params_dir}: unexpected parameter {key} for {DEM_METADATA}")
        if tuple(have[key].shape) != tuple(want[key].shape):
            raise DemError(
                f"{params_dir}: parameter {key} has shape {list(have[key].shape)}, "
                f"{DEM_METADATA} implies {list(want[key].shape)}"
            )
