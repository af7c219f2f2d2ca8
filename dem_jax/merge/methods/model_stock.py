"""``model_stock``: Model Stock (Jang et al. 2024), as mergekit 0.1.5
``merge_methods/model_stock.py::model_stock_merge_method``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.errors import DemError
from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import f32, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec
from dem_jax.merge.tensor_layout import from_hf, to_hf


def model_stock(base, models, *, filter_wise: bool = False) -> jax.Array:
    """Model Stock (mergekit ``model_stock``) for N >= 2 fine-tunes.

    Offsets ``x_i = θ_i - θ_0``; ``cos_ij = (x_i·x_j) / max(|x_i||x_j|, 1e-6)`` clamped
    to [-1, 1]; ``cos`` = mean over pairs ``i < j``; ``t = N cos / (1 + (N-1) cos)``;
    result ``t · mean_i θ_i + (1 - t) · θ_0``. Dot products are over the whole tensor,
    or per row (last axis; a 1-D tensor is one row) with ``filter_wise=True``.
    As in mergekit 0.1.5, where ``|1 + (N-1) cos| < 1e-6`` (no finite estimate) ``t = 0``
    and the base is kept.
    """
    w0 = f32(base)
    ws = stacked(models, "models")
    n_models = ws.shape[0]
    if n_models < 2:
        raise DemError(f"model_stock needs at least 2 fine-tuned models, got {n_models}")
    if ws.shape[1:] != w0.shape:
        raise DemError(f"models shape {ws.shape} does not stack base shape {w0.shape}")
    out_shape = w0.shape
    if filter_wise:
        if w0.ndim < 2:
            w0 = w0.reshape(1, -1)
            ws = ws.reshape(n_models, 1, -1)
    else:
        w0 = w0.reshape(-1)
        ws = ws.reshape(n_models, -1)
    offsets = ws - w0
    norms = jnp.sqrt(jnp.sum(offsets * offsets, axis=-1))
    cos_thetas = []
    for i in range(n_models):
        for j in range(i + 1, n_models):
            dot = jnp.sum(offsets[i] * offsets[j], axis=-1)
            denom = jnp.maximum(norms[i] * norms[j], 1e-6)
            cos_thetas.append(jnp.clip(dot / denom, -1.0, 1.0))
    cos_theta = jnp.mean(jnp.stack(cos_thetas), axis=0)[..., None]
    denominator = 1 + (n_models - 1) * cos_theta
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0.0, (n_models * cos_theta) / jnp.where(singular, 1.0, denominator))
    w_avg = sum0(ws) / n_models
    return (t * w_avg + (1 - t) * w0).reshape(out_shape)


@dataclass(frozen=True, kw_only=True)
class ModelStock(MergeMethod):
    """mergekit's ``model_stock``; ``filter_wise`` rows are the rows of each HF tensor."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer on its own (per HF row with ``filter_wise``)."""
        if not flags["filter_wise"]:
            return jax.vmap(model_stock)(leaf.base, leaf.inputs)
        hb = to_hf(leaf.base, leaf.layout, lead=1)
        hx = to_hf(leaf.inputs, leaf.layout, lead=2)
        out = jax.vmap(functools.partial(model_stock, filter_wise=True))(hb, hx)
        return from_hf(out, leaf.layout, leaf.base.shape, lead=1)


METHODS = (
    ModelStock(
        name="model_stock",
        params=(ParamSpec("filter_wise", bool, False, False),),
        min_models=2,
        static_flags=("filter_wise",),
    ),
)
