"""``nearswap``: take the model's value where it is close to the base's, keep the
base's elsewhere (mergekit 0.1.5 ``merge_methods/nearswap.py::nearswap_merge``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, f32
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec


def nearswap(base, model, t) -> jax.Array:
    """Elementwise ``w = clip(t / max(|base - model|, 1e-6), 0, 1)``, result
    ``w · model + (1 - w) · base``: differences up to ``t`` take the model's value,
    larger ones move towards it by ``t / |difference|``."""
    a, b = f32(base), f32(model)
    w = jnp.clip(f32(t) / jnp.maximum(jnp.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


@dataclass(frozen=True, kw_only=True)
class NearSwap(MergeMethod):
    """mergekit's ``nearswap``: a base and exactly one model."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer with its own ``t``."""
        t = jnp.asarray(leaf.values.shared_array("t"), F32)
        return jax.vmap(nearswap)(leaf.base, leaf.inputs[:, 0], t)


METHODS = (
    NearSwap(name="nearswap", params=(ParamSpec("t", float, False, low=0.0),), max_models=1),
)
