"""``sce``: Select, Calculate, Erase (FuseChat, Wan et al. 2024), as mergekit 0.1.5
``merge_methods/sce.py::sce_merge`` (with ``sce_mask`` and ``sce_weight``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, bcast, f32, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec
from dem_jax.merge.methods.task_arithmetic import sign_consensus
from dem_jax.merge.sparsify import top_k_mask


def sce_select(deltas, select_topk) -> jax.Array:
    """mergekit's ``sce_mask``: boolean mask (``shape``) of the elements whose variance
    across the N task vectors is among the ``k = int(nonzero · select_topk)`` largest,
    ``nonzero`` counting the elements of non-zero variance and the product taken in
    float32 as torch does. ``select_topk >= 1`` keeps all, ``<= 0`` none. Equal
    variances at the cut are taken in flat-index order (torch.topk's is unspecified).
    """
    d = stacked(deltas, "deltas")
    frac = f32(select_topk)
    var = jnp.var(d, axis=0)  # population variance, as torch's unbiased=False
    nonzero = jnp.sum(var != 0, dtype=jnp.int32)
    k = jnp.trunc(nonzero.astype(F32) * frac).astype(jnp.int32)
    keep = top_k_mask(var[None], k[None])[0]
    return jnp.where(frac >= 1, True, jnp.where(frac <= 0, False, keep))


def sce_weights(deltas) -> jax.Array:
    """mergekit's ``sce_weight``: each task vector's mean square, over their sum;
    ``1/N`` each when that sum is below 1e-6 in absolute value."""
    d = stacked(deltas, "deltas")
    power = jnp.mean((d * d).reshape(d.shape[0], -1), axis=1)
    total = jnp.sum(power)
    small = jnp.abs(total) < 1e-6
    return jnp.where(small, 1.0 / d.shape[0], power / jnp.where(small, 1.0, total))


def sce(base, deltas, *, select_topk=1.0) -> jax.Array:
    """SCE on task vectors ``(N, *shape)``: keep the ``select_topk`` fraction of
    elements of largest variance across models (:func:`sce_select`; the others are
    zeroed in every task vector), weigh each task vector by :func:`sce_weights`, erase
    the entries against the majority sign (TIES ``sum`` consensus), and add
    ``Σ_i w_i M_i x_i / max(Σ_i w_i M_i, 1e-6)`` to the base.
    """
    b = f32(base)
    d = stacked(deltas, "deltas")
    d = d * sce_select(d, select_topk)[None]
    erase = sign_consensus(d, None, "sum").astype(F32)
    w = bcast(sce_weights(d), d.ndim) * erase
    return b + sum0(d * w) / jnp.maximum(sum0(w), 1e-6)


@dataclass(frozen=True, kw_only=True)
class Sce(MergeMethod):
    """mergekit's ``sce``; ``int8_mask`` only saves memory there and has no effect."""

    on_deltas: bool = True

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer's tensor on its own."""
        base, xs = leaf.base, leaf.inputs
        deltas = jnp.stack(
            [xs[:, i] if vec else xs[:, i] - base for i, vec in enumerate(leaf.is_vector)], axis=1
        )
        topk = jnp.asarray(leaf.values.shared_array("select_topk"), F32)
        return jax.vmap(lambda b, d, s: sce(b, d, select_topk=s))(base, deltas, topk)


METHODS = (
    Sce(
        name="sce",
        params=(
            ParamSpec("select_topk", float, False, 1.0, 0.0, 1.0),
            ParamSpec("int8_mask", bool, False, False),
        ),
    ),
)
