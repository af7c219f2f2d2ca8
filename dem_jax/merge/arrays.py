"""Array conventions shared by the merge kernels (pure ``jax.numpy``, no I/O).

* ``models`` / ``deltas`` are N tensors stacked on a leading axis, ``(N, *shape)``;
  per-model scalars are ``(N,)`` arrays (a scalar is broadcast to every model).
* Everything is float32 arithmetic with a float32 result (the engine casts).
* No float32 matmul / einsum is used for reductions (they may run in TF32 on GPUs);
  sums over models are chains of elementwise adds (:func:`sum0`).
"""

from __future__ import annotations

import numpy as np

from dem_jax.errors import DemError
from dem_jax.lazy import jax, jnp

F32 = np.float32  # the dtype (jnp.float32 is the same dtype, and would import JAX)


def f32(x) -> jax.Array:
    """``x`` as a float32 array."""
    return jnp.asarray(x, dtype=F32)


def stacked(x, name: str) -> jax.Array:
    """``x`` as float32 with a leading model axis (N, *shape), or a DemError."""
    arr = f32(x)
    if arr.ndim < 1:
        raise DemError(f"{name} must be stacked with a leading model axis, got a scalar")
    return arr


def is_concrete(x) -> bool:
    """True unless ``x`` is being traced by ``jax.jit``."""
    return not isinstance(x, jax.core.Tracer)


def per_model(value, n_models: int, name: str):
    """(N,) per-model parameter: float64 NumPy when concrete, float32 jax when traced."""
    if value is None:
        raise DemError(f"{name}: a value is required")
    if is_concrete(value):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, n_models)):
            raise DemError(f"{name} must be a scalar or have shape ({n_models},), got {arr.shape}")
        return np.broadcast_to(arr.reshape(-1) if arr.ndim else arr, (n_models,))
    arr = jnp.asarray(value, dtype=F32)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, n_models)):
        raise DemError(f"{name} must be a scalar or have shape ({n_models},), got {arr.shape}")
    return jnp.broadcast_to(arr.reshape(-1) if arr.ndim else arr, (n_models,))


def bcast(v, ndim: int) -> jax.Array:
    """(N,) -> (N, 1, ..., 1) so it broadcasts against an (N, *shape) array."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - 1))


def sum0(x: jax.Array) -> jax.Array:
    """Sum over the leading (model) axis as a chain of elementwise adds, in model order.

    XLA:CPU reduces over an outer axis some 40x slower than it adds arrays, and N is
    small; the order ((x0 + x1) + x2) ... is also torch's for mergekit's ``sum(dim=0)``.
    """
    out = x[0]
    for i in range(1, x.shape[0]):
        out = out + x[i]
    return out
