"""``parameter_selection``: each element taken from a randomly chosen model
(parameter-selection merging, Ju et al. 2024; not in mergekit)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import f32, stacked
from dem_jax.merge.method import Leaf, MergeMethod


def parameter_selection(models, key, *, uniform=None) -> jax.Array:
    """Parameter-selection merging (Ju et al. 2024): each element from a random model.

    ``j ~ Uniform{0..N-1}`` independently per element (one ``jax.random.randint`` draw
    over the full parameter shape); result ``θ[j, ...]`` elementwise. With ``uniform``
    (pre-drawn U[0, 1) values of the parameter's shape) ``j = floor(N u)`` instead.
    """
    m = stacked(models, "models")
    if uniform is None:
        idx = jax.random.randint(key, m.shape[1:], 0, m.shape[0])
    else:
        idx = jnp.clip(jnp.floor(f32(uniform) * m.shape[0]), 0, m.shape[0] - 1).astype(jnp.int32)
    return jnp.take_along_axis(m, idx[None], axis=0)[0]


@dataclass(frozen=True, kw_only=True)
class ParameterSelection(MergeMethod):
    """One uniform per element and layer picks the model."""

    def noise_count(self, n_models: int, n_layers: int) -> int:
        """One draw per layer, whatever the number of models."""
        return n_layers

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer from its own uniforms."""
        return jax.vmap(lambda m, u: parameter_selection(m, None, uniform=u))(
            leaf.inputs, leaf.noise
        )


METHODS = (
    ParameterSelection(
        name="parameter_selection", base="ignored", min_models=2, random=True, in_mergekit=False
    ),
)
