"""``passthrough``: one model's tensors, each optionally multiplied by ``scale``
(mergekit 0.1.5 ``merge_methods/passthrough.py::passthrough_merge_method``).

mergekit uses it to stack layer ranges of several models: with ``slices:``, one
source per slice (:mod:`dem_jax.merge.slices`). Each merge it runs takes exactly one
input: a slice's source, a listed model, or the base model alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, bcast
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec


@dataclass(frozen=True, kw_only=True)
class Passthrough(MergeMethod):
    """mergekit's ``passthrough``; ``scale`` defaults to 1 (mergekit: unset, no product,
    the same numbers)."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """The one input, each layer times its own scale."""
        scale = jnp.asarray(leaf.values.model("scale"), F32)[0]  # (L,)
        x = leaf.inputs[:, 0]
        return x * bcast(scale, x.ndim)


METHODS = (
    Passthrough(
        name="passthrough",
        params=(ParamSpec("scale", float, True, 1.0),),
        base="optional",
        max_models=1,
    ),
)
