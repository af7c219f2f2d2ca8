"""``slerp``: spherical interpolation between the base and one model (mergekit 0.1.5
``merge_methods/slerp.py::slerp``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.errors import DemError
from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, f32
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec


def slerp(a, b, t, dot_threshold: float = 0.9995, eps: float = 1e-8) -> jax.Array:
    """Spherical interpolation from ``a`` (mergekit's base model, t=0) to ``b`` (t=1).

    On flattened copies: ``â = a/|a|`` if ``|a| > eps`` else ``a`` (same for ``b``),
    ``c = Σ â ⊙ b̂``. If ``|c| > dot_threshold`` (near parallel or antiparallel) the
    result is ``lerp = (1-t) a + t b``; otherwise with ``θ = arccos(c)``:
    ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b`` (on the unnormalised tensors, as
    mergekit does). The branch is a ``jnp.where``.
    """
    x = f32(a)
    y = f32(b)
    if x.shape != y.shape:
        raise DemError(f"slerp needs equal shapes, got {x.shape} and {y.shape}")
    t = f32(t)
    nx = jnp.sqrt(jnp.sum(x * x))
    ny = jnp.sqrt(jnp.sum(y * y))
    xn = jnp.where(nx > eps, x / jnp.where(nx > eps, nx, 1.0), x)
    yn = jnp.where(ny > eps, y / jnp.where(ny > eps, ny, 1.0), y)
    dot = jnp.clip(jnp.sum(xn * yn), -1.0, 1.0)  # as mergekit 0.1.5
    use_lerp = jnp.abs(dot) > dot_threshold
    safe_dot = jnp.where(use_lerp, 0.0, dot)  # keep the unused branch finite
    theta_0 = jnp.arccos(safe_dot)
    sin_theta_0 = jnp.sin(theta_0)
    theta_t = theta_0 * t
    s0 = jnp.sin(theta_0 - theta_t) / sin_theta_0
    s1 = jnp.sin(theta_t) / sin_theta_0
    return jnp.where(use_lerp, (1 - t) * x + t * y, s0 * x + s1 * y)


@dataclass(frozen=True, kw_only=True)
class Slerp(MergeMethod):
    """mergekit's ``slerp``: the base at t = 0, the one model at t = 1."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer interpolated with its own t."""
        t = jnp.asarray(leaf.values.shared_array("t"), F32)
        return jax.vmap(slerp)(leaf.base, leaf.inputs[:, 0], t)


METHODS = (
    Slerp(name="slerp", params=(ParamSpec("t", float, False, low=0.0, high=1.0),), max_models=1),
)
