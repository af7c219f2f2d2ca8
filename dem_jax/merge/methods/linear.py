"""``linear``: a weighted average of the models themselves (mergekit 0.1.5
``merge_methods/linear.py::LinearMergeTask``). A base model, when given, is averaged
like any other input."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, bcast, per_model, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec, weight


def linear(models, weights, normalize: bool = True) -> jax.Array:
    """Weighted average of the models themselves (mergekit ``linear``).

    ``Σ_i w_i θ_i``, divided by ``Σ_i w_i`` when ``normalize`` (mergekit's default).
    As in mergekit there is no guard: weights summing to 0 give inf/nan.
    """
    m = stacked(models, "models")
    w = jnp.asarray(per_model(1.0 if weights is None else weights, m.shape[0], "weights"), F32)
    wb = bcast(w, m.ndim)
    res = sum0(wb * m)
    if normalize:
        res = res / jnp.sum(w)
    return res


@dataclass(frozen=True, kw_only=True)
class Linear(MergeMethod):
    """mergekit's ``linear``."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Every layer averaged with its own weights."""
        weights = jnp.asarray(leaf.values.model("weight"), F32)
        return jax.vmap(lambda m, w: linear(m, w, flags["normalize"]), in_axes=(0, 1))(
            leaf.inputs, weights
        )


METHODS = (
    Linear(
        name="linear",
        params=(weight(), ParamSpec("normalize", bool, False, True)),
        base="optional",
        static_flags=("normalize",),
    ),
)
