"""The small public API: load, save and run a model, whatever kind of directory.

import dem_jax
mesh = dem_jax.make_mesh(fsdp=2, tensor=4)          # optional
model = dem_jax.load_model("path/to/model", mesh=mesh)
logits = dem_jax.forward(model, tokens)             # (B, T, V) float32
dem_jax.save_model(model, "out", format="hf")
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dem_jax.io.modeldir import Model
from dem_jax.io.models import init_model, load_model, save_model
from dem_jax.model import transformer as model_lib
from dem_jax.sharding.rules import batch_sharding

__all__ = ["forward", "init_model", "load_model", "save_model"]


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
