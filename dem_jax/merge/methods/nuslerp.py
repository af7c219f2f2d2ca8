"""``nuslerp``: spherical interpolation of two models, or of two task vectors when a
base is given (mergekit 0.1.5 ``merge_methods/nuslerp.py::nuslerp_merge_method``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, f32
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec, weight
from dem_jax.merge.tensor_layout import from_hf, to_hf


def nuslerp(t, v0, v1, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8):
    """mergekit's ``nuslerp``: from ``v0`` (t = 0) to ``v1`` (t = 1) on the sphere.

    The vectors are the whole tensor (``flatten``), else the rows along the last axis,
    or with ``row_wise`` the vectors along axis 0 (mergekit transposes 0 and -1).
    Per vector: ``û = u / max(|u|, 1e-7)``, ``c = clip(û·v̂, -1, 1)``; where
    ``1 - c² <= eps²`` (colinear) the result is ``(1-t) v0 + t v1``, otherwise with
    ``θ = arccos c``: ``(sin((1-t)θ) v0 + sin(tθ) v1) / sin θ`` (unnormalised vectors).
    """
    shape = v0.shape
    x, y = f32(v0), f32(v1)
    if flatten:
        x, y = x.reshape(-1), y.reshape(-1)
    elif row_wise:
        x, y = jnp.swapaxes(x, 0, -1), jnp.swapaxes(y, 0, -1)

    def unit(v):
        return v / jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)), 1e-7)

    t = f32(t)
    cos = jnp.clip(jnp.sum(unit(x) * unit(y), axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos * cos) <= eps**2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))  # the unused branch stays finite
    spherical = (jnp.sin((1 - t) * theta) * x + jnp.sin(t * theta) * y) / jnp.sin(theta)
    out = jnp.where(colinear, (1 - t) * x + t * y, spherical)
    if row_wise and not flatten:
        out = jnp.swapaxes(out, 0, -1)
    return out.reshape(shape)


def nuslerp_t(weights) -> jax.Array:
    """The interpolation point from the two weights: ``w1 / (w0 + w1)``, or 0.5 when
    ``|w0 + w1| < 1e-6`` (mergekit). ``weights`` is ``(2, ...)``."""
    w = f32(weights)
    total = w[0] + w[1]
    small = jnp.abs(total) < 1e-6
    return jnp.where(small, 0.5, w[1] / jnp.where(small, 1.0, total))


@dataclass(frozen=True, kw_only=True)
class NuSlerp(MergeMethod):
    """mergekit's ``nuslerp``: exactly two models; with a base, their task vectors are
    interpolated and added to it. Rows are the rows of each Hugging Face tensor."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer with its own weights."""
        t = nuslerp_t(jnp.asarray(leaf.values.model("weight"), F32))  # (L,)
        x = to_hf(leaf.inputs, leaf.layout, lead=2)  # (L, 2, *hf)
        base = None if leaf.base is None else to_hf(leaf.base, leaf.layout, lead=1)
        if base is not None:
            x = x - base[:, None]
        fn = functools.partial(
            nuslerp, row_wise=flags["nuslerp_row_wise"], flatten=flags["nuslerp_flatten"]
        )
        out = jax.vmap(fn)(t, x[:, 0], x[:, 1])
        if base is not None:
            out = base + out
        return from_hf(out, leaf.layout, leaf.inputs[:, 0].shape, lead=1)


METHODS = (
    NuSlerp(
        name="nuslerp",
        params=(
            weight(),
            ParamSpec("nuslerp_row_wise", bool, False, False),
            ParamSpec("nuslerp_flatten", bool, False, True),
        ),
        base="if_given",
        min_models=2,
        max_models=2,
        static_flags=("nuslerp_row_wise", "nuslerp_flatten"),
    ),
)
