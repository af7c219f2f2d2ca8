"""``karcher``: the Riemannian (Karcher) mean of the models' directions on the unit
sphere, scaled by their mean norm (mergekit 0.1.5
``merge_methods/karcher.py::karcher_merge_tensors``). A base model, when given, is
averaged like any other input, as in mergekit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, f32, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec


def _norm(x, axis=None):
    return jnp.sqrt(jnp.sum(x * x, axis=axis))


def karcher(models, *, max_iter=10, tol=1e-5) -> jax.Array:
    """mergekit's ``karcher_merge_tensors`` with equal weights ``1/N`` (whole tensors).

    ``u_i = θ_i / |θ_i|`` (0 for a zero tensor); inputs with ``|θ_i| <= tol`` take no
    part in the direction, the others weigh ``a_i = 1/V`` each (V of them). The start
    is ``Σ a_i u_i`` normalised (the first such ``u_i`` if its norm is < tol); then up
    to ``max_iter`` steps: ``T = Σ a_i θ_i/sin θ_i (u_i - cos θ_i m)`` over the inputs
    with ``θ_i = arccos(clip(m·u_i)) >= tol``; stop when ``|T| < tol``, else
    ``m ← cos|T| m + sin|T| T/|T|``, renormalised when its norm is > tol. The result is
    ``(Σ_i |θ_i| / N) m``, zero when no input is above ``tol``. The stopping rule is a
    ``lax.while_loop``, so ``max_iter`` and ``tol`` may be traced.
    """
    x = stacked(models, "models")
    n = x.shape[0]
    if n == 1:
        return x[0]
    flat = x.reshape(n, -1)
    tol, max_iter = f32(tol), jnp.asarray(max_iter, jnp.int32)
    norms = _norm(flat, axis=-1)  # (N,)
    zero = norms == 0
    units = jnp.where(zero[:, None], 0.0, flat / jnp.where(zero, 1.0, norms)[:, None])
    valid = norms > tol
    alpha = F32(1.0 / n)
    a = jnp.where(valid, alpha / jnp.sum(jnp.where(valid, alpha, 0.0)), 0.0)
    mean = sum0(a[:, None] * units)
    mean_norm = _norm(mean)
    first = units[jnp.argmax(valid)]
    mean = jnp.where(mean_norm < tol, first, mean / jnp.where(mean_norm < tol, 1.0, mean_norm))

    def step(state):
        i, m, _ = state
        dots = jnp.clip(jnp.sum(units * m, axis=-1), -1.0, 1.0)  # (N,)
        theta = jnp.arccos(dots)
        used = valid & (theta >= tol)
        coef = jnp.where(used, a * (theta / jnp.where(used, jnp.sin(theta), 1.0)), 0.0)
        tangent = sum0(coef[:, None] * (units - dots[:, None] * m))
        t_norm = _norm(tangent)
        done = t_norm < tol
        moved = jnp.cos(t_norm) * m + jnp.sin(t_norm) * (tangent / jnp.where(done, 1.0, t_norm))
        m_norm = _norm(moved)
        moved = jnp.where(m_norm > tol, moved / jnp.where(m_norm > tol, m_norm, 1.0), moved)
        return i + 1, jnp.where(done, m, moved), done

    def running(state):
        i, _, done = state
        return (i < max_iter) & ~done

    _, mean, _ = jax.lax.while_loop(running, step, (jnp.int32(0), mean, jnp.bool_(False)))
    scale = sum0(alpha * norms)
    return jnp.where(jnp.any(valid), scale * mean, 0.0).reshape(x.shape[1:])


@dataclass(frozen=True, kw_only=True)
class Karcher(MergeMethod):
    """mergekit's ``karcher``: every input (the base too, when given) weighs the same."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Each layer on its own, with its own ``max_iter`` and ``tol``."""
        max_iter = jnp.asarray(leaf.values.shared_array("max_iter"), jnp.int32)
        tol = jnp.asarray(leaf.values.shared_array("tol"), F32)
        return jax.vmap(lambda m, k, e: karcher(m, max_iter=k, tol=e))(leaf.inputs, max_iter, tol)


METHODS = (
    Karcher(
        name="karcher",
        params=(
            ParamSpec("max_iter", int, False, 10, 0.0),
            ParamSpec("tol", float, False, 1e-5, 0.0),
        ),
        base="optional",
    ),
)
