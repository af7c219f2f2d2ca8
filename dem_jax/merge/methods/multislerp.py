"""``multislerp``: barycentric interpolation of N models (or task vectors) on the
hypersphere (mergekit 0.1.5 ``merge_methods/multislerp.py::multislerp``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, f32, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec, weight


def _norm(x, axis=None, keepdims=False):
    return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


def multislerp(
    models, weights, base=None, *, normalize_weights: bool = True, eps=1e-8
) -> jax.Array:
    """mergekit's ``multislerp`` over whole (flattened) tensors.

    One input is returned as it is. Otherwise ``x_i = θ_i - base`` (or ``θ_i``),
    ``w /= Σ w`` when ``normalize_weights``, ``u_i = x_i / (|x_i| + eps)``; the mean
    direction ``m = Σ w_i u_i / |Σ w_i u_i|``; tangents ``τ_i = u_i - (u_i·m) m``,
    ``τ = Σ w_i τ_i``, ``r = |τ| + eps``; the result is
    ``(m cos r + τ sin r / r) · Σ w_i |x_i|`` (+ base).

    Where ``|Σ w_i u_i| < eps`` mergekit takes ``Σ w_i x_i`` (+ base) for two inputs
    and raises for more; a jitted kernel cannot raise, so here every N takes that
    weighted sum (e.g. a tensor no model changed keeps the base).
    """
    x = stacked(models, "models")
    n = x.shape[0]
    if n == 1:
        return x[0]
    if base is not None:
        x = x - f32(base)
    flat = x.reshape(n, -1)
    w = f32(weights)
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = _norm(flat, axis=-1, keepdims=True)  # (N, 1)
    units = flat / (norms + eps)
    mean = sum0(units * w[:, None])
    mean_norm = _norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    dots = jnp.sum(units * mean, axis=-1, keepdims=True)
    tangent = sum0((units - dots * mean) * w[:, None])
    r = _norm(tangent) + eps
    out = (mean * jnp.cos(r) + tangent * (jnp.sin(r) / r)) * jnp.sum(norms[:, 0] * w)
    out = jnp.where(degenerate, sum0(flat * w[:, None]), out).reshape(x.shape[1:])
    return out if base is None else out + f32(base)


@dataclass(frozen=True, kw_only=True)
class MultiSlerp(MergeMethod):
    """mergekit's ``multislerp``; with a base, on the task vectors."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer with its own weights (and eps)."""
        w = jnp.asarray(leaf.values.model("weight"), F32)  # (N, L)
        eps = jnp.asarray(leaf.values.shared_array("eps"), F32)  # (L,)
        fn = functools.partial(multislerp, normalize_weights=flags["normalize_weights"])
        if leaf.base is None:
            return jax.vmap(lambda m, w_, e: fn(m, w_, eps=e), in_axes=(0, 1, 0))(
                leaf.inputs, w, eps
            )
        return jax.vmap(lambda m, w_, b, e: fn(m, w_, b, eps=e), in_axes=(0, 1, 0, 0))(
            leaf.inputs, w, leaf.base, eps
        )


METHODS = (
    MultiSlerp(
        name="multislerp",
        params=(
            weight(),
            ParamSpec("normalize_weights", bool, False, True),
            ParamSpec("eps", float, False, 1e-8, 0.0),
        ),
        base="if_given",
        static_flags=("normalize_weights",),
    ),
)
