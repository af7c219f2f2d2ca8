"""``arcee_fusion``: keep the model's change only where it matters most, by a KL-weighted
importance above an outlier threshold (mergekit 0.1.5
``merge_methods/arcee_fusion.py::arcee_fusion_merge_method``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import f32
from dem_jax.merge.method import Leaf, MergeMethod
from dem_jax.merge.tensor_layout import from_hf, to_hf

_SIGN = np.uint32(0x80000000)


def kth_smallest(x, k: int) -> jax.Array:
    """The ``k``-th smallest (0-based) element of ``x``, as ``sort(x.ravel())[k]``.

    Found bit by bit over order-preserving integer keys of the float32 values (32
    counting passes, a radix select) rather than by sorting: counting shards cleanly
    where a sort must gather the tensor.
    """
    bits = jax.lax.bitcast_convert_type(f32(x).reshape(-1), jnp.uint32)
    negative = (bits & _SIGN) != 0
    keys = jnp.where(negative, ~bits, bits | _SIGN)  # unsigned order == float order

    def bit(i, v):  # the largest v with fewer than k + 1 keys below it is the answer
        cand = v | jnp.left_shift(jnp.uint32(1), jnp.uint32(31 - i))
        return jnp.where(jnp.sum(keys < cand, dtype=jnp.int32) <= k, cand, v)

    v = jax.lax.fori_loop(0, 32, bit, jnp.uint32(0))
    v = jnp.where((v & _SIGN) != 0, v & ~_SIGN, ~v)
    return jax.lax.bitcast_convert_type(v, jnp.float32)


def fusion_importance(base, model) -> jax.Array:
    """``|model - base| · KL(p ‖ q)`` per element, ``p``/``q`` the softmax over the last
    axis of model/base plus 1e-8, the KL taken per row (mergekit ``_compute_importance``)."""
    b, m = f32(base), f32(model)
    p = jax.nn.softmax(m, axis=-1) + 1e-8
    q = jax.nn.softmax(b, axis=-1) + 1e-8
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return jnp.abs(m - b) * kl


def arcee_fusion(base, model) -> jax.Array:
    """mergekit's Arcee Fusion on one tensor (rows along the last axis).

    Threshold ``median + 1.5 (q3 - q1)`` of the importance, the quantiles taken as
    ``sorted[int(q · (numel - 1))]`` (float32 product, as mergekit); the result is
    ``base + (model - base)`` where the importance reaches it, ``base`` elsewhere.
    mergekit estimates the quantiles from a random sample of 10⁶ elements (with
    replacement) in tensors larger than that; here they are always exact.
    """
    b, m = f32(base), f32(model)
    importance = fusion_importance(b, m)
    last = np.float32(importance.size - 1)
    q1, median, q3 = (
        kth_smallest(importance, int(np.float32(q) * last)) for q in (0.25, 0.5, 0.75)
    )
    keep = importance >= median + 1.5 * (q3 - q1)
    return b + (m - b) * keep.astype(jnp.float32)


@dataclass(frozen=True, kw_only=True)
class ArceeFusion(MergeMethod):
    """mergekit's ``arcee_fusion``: a base and exactly one model; rows are the rows of
    each Hugging Face tensor (the softmax runs along them)."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer's tensor on its own."""
        base = to_hf(leaf.base, leaf.layout, lead=1)
        model = to_hf(leaf.inputs[:, 0], leaf.layout, lead=1)
        return from_hf(jax.vmap(arcee_fusion)(base, model), leaf.layout, leaf.base.shape, lead=1)


METHODS = (ArceeFusion(name="arcee_fusion", max_models=1),)
