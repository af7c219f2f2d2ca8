"""The distribution-edited parameters Θ + Σ_i ω_i ΔΘ_i, leaf by leaf.

ω is one weight per distribution, shape (k,), or one per layer for the parameters
stacked over layers plus one for the rest (embeddings, final norm, output head):
shape (k, L + 1). Pure: jittable and differentiable in ω.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dem_jax.config.model import ModelConfig
from dem_jax.model.transformer import param_axes


def layer_leaves(config: ModelConfig) -> dict[str, Any]:
    """True for every parameter stacked over layers (leading ``layers`` axis)."""
    return jax.tree.map(
        lambda axes: bool(axes) and axes[0] == "layers",
        param_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _leaf_weight(w: jax.Array, stacked: bool, ndim: int) -> jax.Array:
    """One distribution's weight for one leaf: a scalar, or (L,) per layer broadcast
    over the leaf's other dimensions; the last per-layer entry weighs non-layer leaves."""
    if w.ndim == 0:
        return w
    if stacked:
        return w[:-1].reshape(-1, *([1] * (ndim - 1)))
    return w[-1]


def edit_params(base: Any, vectors: Sequence[Any], omega: jax.Array, stacked: Any) -> Any:
    """Θ + Σ_i ω_i ΔΘ_i, leaf by leaf, in float32, cast back to the base's dtype.

    ``omega`` is (k,), or (k, L + 1) for per-layer weights; ``stacked`` is
    :func:`layer_leaves` of the model.
    """

    def leaf(is_stacked, b, *vs):
        acc = b.astype(jnp.float32)
        for i, v in enumerate(vs):
            acc = acc + _leaf_weight(omega[i], is_stacked, b.ndim) * v.astype(jnp.float32)
        return acc.astype(b.dtype)

    return jax.tree.map(leaf, stacked, base, *vectors)
