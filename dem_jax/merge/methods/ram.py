"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (arXiv:2601.13572), as mergekit
0.1.5 ``merge_methods/ram.py::ram_merge`` / ``ramplus_tl_merge``.

Each element of the merged task vector is the one model's change where only one
model changed it (by more than ``epsilon``), and the mean of the changes where
several did. RAM+ (tensor-local) also scales each model's unique changes by
``1 + r · clip(shared_i / unique_i, 0, alpha)``, its counts of shared and unique
changed elements in the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, bcast, f32, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec


def ram(base, deltas, *, epsilon=1e-5, r=None, alpha=0.2) -> jax.Array:
    """``base + Σ_i x_i [|x_i| > ε] (u + o / max(c, 1))`` over task vectors ``(N, *s)``,
    ``c`` the number of models with ``|x_i| > ε`` at an element, ``u = [c == 1]``,
    ``o = [c > 1]``. With ``r`` (RAM+): the unique part of model i is also multiplied
    by ``λ_i = 1 + r · clip(S_i / max(U_i, ε), 0, alpha)``, ``S_i`` / ``U_i`` its counts
    of changed elements that are shared / unique (float32, as mergekit)."""
    b = f32(base)
    d = stacked(deltas, "deltas")
    eps = f32(epsilon)
    changed = jnp.abs(d) > eps
    counts = jnp.sum(changed, axis=0, dtype=jnp.int32)
    overlap, unique = counts > 1, counts == 1
    kept = d * changed
    unique_part = kept * unique
    if r is not None:
        axes = tuple(range(1, d.ndim))
        shared_n = jnp.sum(changed & overlap, axis=axes, dtype=jnp.int32).astype(F32)
        unique_n = jnp.sum(changed & unique, axis=axes, dtype=jnp.int32).astype(F32)
        rho = shared_n / jnp.maximum(unique_n, eps)
        lam = 1 + f32(r) * jnp.clip(rho, 0.0, f32(alpha))
        unique_part = unique_part * bcast(lam, d.ndim)
    shared_part = kept * overlap / jnp.maximum(counts, 1).astype(F32)
    return b + sum0(unique_part + shared_part)


@dataclass(frozen=True, kw_only=True)
class Ram(MergeMethod):
    """mergekit's ``ram`` (``plus=False``) or ``ramplus_tl`` (``plus=True``)."""

    plus: bool = False
    on_deltas: bool = True

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer's tensor on its own, with its own parameters."""
        base, xs = leaf.base, leaf.inputs
        deltas = jnp.stack(
            [xs[:, i] if vec else xs[:, i] - base for i, vec in enumerate(leaf.is_vector)], axis=1
        )
        names = ("epsilon", "r", "alpha") if self.plus else ("epsilon",)
        values = [jnp.asarray(leaf.values.shared_array(n), F32) for n in names]
        return jax.vmap(lambda b, d, *v: ram(b, d, **dict(zip(names, v, strict=True))))(
            base, deltas, *values
        )


_EPSILON = ParamSpec("epsilon", float, False, 1e-5, 0.0)
METHODS = (
    Ram(name="ram", params=(_EPSILON,)),
    Ram(
        name="ramplus_tl",
        params=(
            ParamSpec("r", float, False, 0.1),
            ParamSpec("alpha", float, False, 0.2),
            _EPSILON,
        ),
        plus=True,
    ),
)
