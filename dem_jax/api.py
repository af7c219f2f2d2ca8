"""The small public API: load, save and run a model, whatever kind of directory.

import dem_jax
mesh = dem_jax.make_mesh(fsdp=2, tensor=4)          # optional
model = dem_jax.load_model("path/to/model", mesh=mesh)
logits = dem_jax.forward(model, tokens)             # (B, T, V) float32
dem_jax.save_model(model, "out", format="hf")
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dem_jax.config.run import ModelConfig
from dem_jax.io.hf.checkpoint import DEFAULT_MAX_SHARD_BYTES, load_hf, save_hf
from dem_jax.io.modeldir import Model, model_format
from dem_jax.io.orbax import load_orbax, save_orbax
from dem_jax.model import transformer as model_lib
from dem_jax.sharding.rules import batch_sharding, param_shardings

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


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, config, tokens, positions, segment_ids):
    return model_lib.apply(params, config, tokens, positions, segment_ids)


def forward(
    model: Model,
    tokens,
    attention_mask=None,
    positions=None,
    segment_ids=None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Logits (B, T, V) float32 for token ids (B, T), jitted.

    ``attention_mask`` (B, T; 1 = token, 0 = padding) keeps real tokens from
    attending to padding; ``segment_ids`` separate packed documents instead.
    Positions default to 0..T-1 (or the position within each segment).
    With ``mesh`` the batch is split over its data-parallel axes.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if attention_mask is not None and segment_ids is None:
        segment_ids = jnp.asarray(attention_mask, jnp.int32)
    if positions is None:
        positions = (
            jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            if segment_ids is None or attention_mask is not None
            else model_lib.segment_positions(jnp.asarray(segment_ids))
        )
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    args = [tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)]
    if mesh is not None:
        args = [jax.device_put(a, batch_sharding(mesh)) for a in args]
    return _forward(model.params, model.config, *args)
