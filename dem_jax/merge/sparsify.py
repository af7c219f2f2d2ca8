"""Sparsifiers of task vectors, as jit-able JAX functions (pure: no I/O).

Each takes stacked deltas ``(N, *shape)`` and per-model densities (and gamma /
epsilon) and returns the sparsified ``(N, *shape)`` float32 deltas. They follow
mergekit 0.1.5's ``mergekit/sparsify.py``:

==========================  ==============================================================
function                    mergekit source
==========================  ==============================================================
sparsify_magnitude          ``magnitude`` (TIES trim)
sparsify_random             ``bernoulli`` (DARE)
sparsify_breadcrumbs        ``magnitude_outliers``
sparsify_della              ``della_magprune`` (earlier ``rank_magnitude`` /
                            ``rank_magnitude_sampling``)
della_keep_probabilities    the probability step of ``della_magprune``
==========================  ==============================================================

Rescaling (the ``rescale`` argument)
-------------------------------------
mergekit 0.1.5 maps ``rescale: true`` to ``RescaleNorm.l1`` for *every* sparsifier
(DARE and DELLA included): the masked delta is scaled so its L1 norm equals the
unmasked one (``rescaled_masked_tensor``, skipped when either norm is < 1e-7). That is
``rescale="l1"`` here, and what the merge engine passes for a mergekit
``rescale: true``. ``rescale=True`` keeps the papers' per-sparsifier meaning below.

mergekit changed what ``rescale: true`` means over time. In its boolean-``rescale`` sparsify.py
DARE keeps ``x / density`` and magnitude / magnitude_outliers rescale the kept values so
the tensor's L1 norm is unchanged (``rescale_sum``, applied only when both sums are
>= 1e-8); DELLA's ``x / p_i`` per element is the DELLA authors' ``rank_magnitude``
(their mergekit fork, which mergekit adopted as ``rank_magnitude_sampling``). Current
mergekit maps ``rescale: true`` to ``RescaleNorm.l1`` for every sparsifier
(``rescaled_masked_tensor``: scale the masked tensor to the original L1 norm, skipped
when either norm is < 1e-7). Here ``rescale=True`` gives the per-sparsifier (paper)
meaning above, and ``rescale="l1" | "l2" | "linf"`` gives current mergekit's
norm-matching (``"l1"`` reproduces current mergekit's ``rescale: true``).
``rescale=False`` keeps the masked values as they are.

Counts and ties
---------------
mergekit computes counts as ``int(density * numel)`` in Python float64. When a
density / gamma is concrete (a Python float, NumPy or eager JAX value) the counts here
are computed the same way on the host. When it is traced (passed as an argument into
``jax.jit``) the product is taken in float32, which can differ by one where
``density * numel`` is within float32 rounding of an integer (e.g. mergekit's
``int(0.29 * 100) == 28`` but float32 gives 29); close over the densities (or pass them
as static values) to get mergekit's counts exactly under jit. Magnitude ordering uses a
stable sort of ``|x|`` (float32), so equal magnitudes are ordered by flat index:
``sparsify_magnitude`` keeps the earlier element first, ``sparsify_breadcrumbs`` and
DELLA rank the earlier element lower. mergekit uses ``torch.argsort`` / ``torch.sort``
with ``stable=False``, whose order among equal magnitudes is unspecified.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from dem_jax.errors import DemError
from dem_jax.lazy import jax, jnp
from dem_jax.merge.arrays import F32, bcast, f32, per_model, stacked

Rescale = bool | Literal["l1", "l2", "linf"] | None

_NORMS = ("l1", "l2", "linf")
# mergekit's thresholds: rescale_sum (boolean-rescale API) and rescaled_masked_tensor.
_RESCALE_SUM_EPS = 1e-8
_RESCALE_NORM_EPS = 1e-7


def _count(frac, numel: int) -> jax.Array:
    """mergekit's ``int(frac * numel)`` per model, as int32 (host float64 when concrete)."""
    if isinstance(frac, np.ndarray):
        k = np.trunc(frac * numel)
        return jnp.asarray(np.clip(k, -(2**31), 2**31 - 1).astype(np.int32))
    return jnp.trunc(frac * F32(numel)).astype(jnp.int32)


_KEY_MAX = 0x7FFFFFFF  # the largest int32: reverses the order of non-negative keys


def _largest(mag: jax.Array, k) -> jax.Array:
    """Boolean mask of the ``k[i]`` largest entries of each ``mag[i]`` (non-negative);
    among equal values the lower flat index is taken first, as a stable descending
    sort orders them. ``k`` is ``(N,)`` int."""
    return _top_keys(jax.lax.bitcast_convert_type(mag.astype(F32), jnp.int32), k)


def top_k_mask(mag: jax.Array, k) -> jax.Array:
    """Boolean mask of the ``k[i]`` largest entries of each non-negative ``mag[i]``
    (``k`` is ``(N,)`` int, may be traced); ties are taken in flat-index order."""
    return _largest(mag, k)


def _smallest(mag: jax.Array, k) -> jax.Array:
    """Mask of the ``k[i]`` smallest entries of each ``mag[i]``, lower index first (the
    order of a stable ascending sort)."""
    bits = jax.lax.bitcast_convert_type(mag.astype(F32), jnp.int32)
    return _top_keys(_KEY_MAX - bits, k)


def _top_keys(keys: jax.Array, k) -> jax.Array:
    """Mask of the ``k[i]`` largest int32 ``keys[i]`` (all >= 0), lower index first.

    A non-negative float's bit pattern is ordered like the float, so the k-th
    largest key is found bit by bit (31 counting passes, a radix select) instead of
    by sorting: XLA:CPU sorts ~20x slower than NumPy, and counting shards cleanly
    where a sort must gather. Equal keys at the threshold are then taken in index
    order (a cumulative sum), only when there are more of them than needed.
    """
    n = keys.shape[0]
    axes = tuple(range(1, keys.ndim))
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n,))

    def bcast(v):
        return v.reshape((n,) + (1,) * (keys.ndim - 1))

    def bit(i, v):  # keep bit 30 - i of the threshold if enough keys reach it
        cand = v | jnp.left_shift(jnp.int32(1), 30 - i)
        enough = jnp.sum(keys >= bcast(cand), axis=axes, dtype=jnp.int32) >= k
        return jnp.where(enough, cand, v)

    v = bcast(jax.lax.fori_loop(0, 31, bit, jnp.zeros((n,), jnp.int32)))
    above, at = keys > v, keys == v
    need = bcast(k - jnp.sum(above, axis=axes, dtype=jnp.int32))  # threshold ties to take

    def first_ties(_):
        order = jnp.cumsum(at.reshape(n, -1), axis=1, dtype=jnp.int32).reshape(keys.shape)
        return above | (at & (order <= need))

    excess = jnp.any(jnp.sum(at, axis=axes, dtype=jnp.int32) > need.reshape(n))
    return jax.lax.cond(excess, first_ties, lambda _: above | at, None)


def _ranks(x: jax.Array, *, descending: bool) -> jax.Array:
    """0-based rank of every element along the last axis (stable: ties by index)."""
    order = jnp.argsort(x, axis=-1, stable=True, descending=descending)
    # The inverse permutation by a second sort: compiles several times faster on CPU
    # than scattering positions with put_along_axis, same result.
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def _norm_rescale(delta: jax.Array, mask: jax.Array, norm: str, eps: float) -> jax.Array:
    """Masked tensor scaled per model so its ``norm`` equals the unmasked one.

    Follows mergekit's ``rescaled_masked_tensor`` / ``rescale_sum``: the scale is
    applied only when both norms are >= eps, otherwise the masked tensor is returned.
    """
    masked = delta * mask
    axes = tuple(range(1, delta.ndim))
    if norm == "l1":
        before = jnp.sum(jnp.abs(delta), axis=axes)
        after = jnp.sum(jnp.abs(masked), axis=axes)
    elif norm == "l2":
        before = jnp.sqrt(jnp.sum(delta * delta, axis=axes))
        after = jnp.sqrt(jnp.sum(masked * masked, axis=axes))
    elif norm == "linf":
        before = jnp.max(jnp.abs(delta), axis=axes, initial=0.0)
        after = jnp.max(jnp.abs(masked), axis=axes, initial=0.0)
    else:
        raise DemError(f"unknown rescale norm {norm!r}; expected one of {_NORMS}")
    ok = (before >= eps) & (after >= eps)
    scale = jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)
    return masked * bcast(scale, delta.ndim)


def _bernoulli(key, p, shape, uniform) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, or the same from pre-drawn uniforms."""
    if uniform is not None:
        return f32(uniform) < p
    return jax.random.bernoulli(key, p, shape)


def _check_rescale(rescale: Rescale) -> None:
    if not (rescale is None or isinstance(rescale, bool) or rescale in _NORMS):
        raise DemError(f"rescale must be a bool or one of {_NORMS}, got {rescale!r}")


def _deterministic_rescale(delta: jax.Array, mask: jax.Array, rescale: Rescale) -> jax.Array:
    """Rescale for the deterministic sparsifiers (magnitude, breadcrumbs)."""
    _check_rescale(rescale)
    if not rescale:
        return delta * mask
    if rescale is True:  # mergekit's boolean-API ``rescale_sum``: keep the L1 norm
        return _norm_rescale(delta, mask, "l1", _RESCALE_SUM_EPS)
    return _norm_rescale(delta, mask, rescale, _RESCALE_NORM_EPS)


# ------------------------------------------------------------------------ sparsifiers


def sparsify_magnitude(deltas, density, *, rescale: Rescale = False) -> jax.Array:
    """TIES trim: per model keep the ``k`` largest ``|x|``, zero the rest.

    ``k_i = max(1, int(density_i * numel))`` (mergekit 0.1.5 ``magnitude``: a positive
    density keeps at least one element); kept = the ``k_i`` elements of largest ``|x|``
    (stable sort: among equal magnitudes the lower flat index is kept).
    ``density_i >= 1`` returns the model's delta unchanged, ``density_i <= 0`` zeros.

    Args:
      deltas: ``(N, *shape)`` task vectors.
      density: ``(N,)`` (or scalar) fraction to keep.
      rescale: False (mergekit's TIES default); True = rescale kept values to the
        original L1 norm (mergekit ``rescale_sum``); "l1"/"l2"/"linf" = current
        mergekit's norm matching.
    """
    d = stacked(deltas, "deltas")
    n_models, numel = d.shape[0], math.prod(d.shape[1:])
    dens = per_model(density, n_models, "density")
    dens_arr = jnp.asarray(dens)
    k = jnp.where(dens_arr > 0, jnp.maximum(_count(dens, numel), 1), 0)
    mask = _largest(jnp.abs(d), k).astype(F32)
    out = _deterministic_rescale(d, mask, rescale)
    return jnp.where(bcast(dens_arr >= 1, d.ndim), d, out)


def sparsify_random(deltas, density, key, rescale: Rescale = True, *, uniform=None) -> jax.Array:
    """DARE drop-and-rescale: keep each element with probability ``density``.

    ``m ~ Bernoulli(density_i)`` elementwise (one ``jax.random.bernoulli`` draw over the
    whole ``(N, *shape)``); result ``x * m / density_i`` with ``rescale=True``
    (``E[result] = x``), ``x * m`` with ``rescale=False``, or current mergekit's norm
    matching with ``rescale="l1"|"l2"|"linf"``. ``density_i >= 1`` returns the delta
    unchanged (mergekit ``bernoulli``); ``density_i <= 0`` gives zeros (mergekit would
    divide 0 by 0). ``uniform`` (pre-drawn U[0, 1) values of the deltas' shape) replaces
    the draw: ``uniform < p`` is exactly ``jax.random.bernoulli(key, p)`` for
    ``uniform = jax.random.uniform(key, shape)``, so ``key`` may then be None.
    """
    _check_rescale(rescale)
    d = stacked(deltas, "deltas")
    dens_raw = per_model(density, d.shape[0], "density")
    p = bcast(jnp.asarray(dens_raw, F32), d.ndim)
    keep = _bernoulli(key, p, d.shape, uniform)
    if rescale is True:
        out = jnp.where(keep, d / jnp.where(p > 0, p, 1.0), 0.0)
    elif rescale:
        out = _norm_rescale(d, keep.astype(F32), rescale, _RESCALE_NORM_EPS)
    else:
        out = jnp.where(keep, d, 0.0)
    return jnp.where(bcast(jnp.asarray(dens_raw >= 1), d.ndim), d, out)


def sparsify_breadcrumbs(deltas, density, gamma, *, rescale: Rescale = False) -> jax.Array:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): keep a middle band of ``|x|``.

    With ``n = numel``: ``target = int(density*n)``, ``n_top = int(gamma*n)``,
    ``n_bot = n - target - n_top``; if ``n_bot < 0`` then ``n_top += n_bot`` and
    ``n_bot = 0``. Sorting ``|x|`` ascending (stable), the elements of ascending rank
    ``n_bot <= r < n - n_top`` are kept: the ``n_top`` largest are dropped as
    outliers and the ``n_bot`` smallest as noise, so ``target`` remain.
    ``density_i >= 1`` returns the delta unchanged (even with ``gamma > 0``).

    mergekit 0.1.5 keeps ``sorted[n_bot : n_bot + target]``, the same set. (Earlier
    mergekit sliced ``indices[n_bot:-n_top]``, empty when ``n_top == 0``.) ``rescale``
    as in :func:`sparsify_magnitude` (mergekit default False).
    """
    d = stacked(deltas, "deltas")
    n_models, numel = d.shape[0], math.prod(d.shape[1:])
    dens = per_model(density, n_models, "density")
    gam = per_model(gamma, n_models, "gamma")
    target = _count(dens, numel)
    n_top = _count(gam, numel)
    n_bot = numel - target - n_top
    n_top = jnp.where(n_bot < 0, n_top + n_bot, n_top)
    n_bot = jnp.maximum(n_bot, 0)
    mag = jnp.abs(d)
    keep = _smallest(mag, numel - n_top) & ~_smallest(mag, n_bot)
    out = _deterministic_rescale(d, keep.astype(F32), rescale)
    return jnp.where(bcast(jnp.asarray(dens) >= 1, d.ndim), d, out)


def _validate_della(dens, eps) -> None:
    """mergekit raises unless density +/- epsilon is in (0, 1) (checked when concrete)."""
    if not (isinstance(dens, np.ndarray) and isinstance(eps, np.ndarray)):
        return
    for i, (di, ei) in enumerate(zip(dens, eps, strict=True)):
        if 0 < di < 1 and (di + ei >= 1 or di - ei <= 0):
            raise DemError(
                f"model {i}: DELLA epsilon must be chosen so that density +/- epsilon is "
                f"in (0, 1); got density={di}, epsilon={ei}"
            )


def della_keep_probabilities(deltas, density, epsilon, *, rank_axis: int = 1) -> jax.Array:
    """DELLA MagPrune keep probabilities, shape ``(N, *shape)``.

    Within each row (mergekit ranks along ``dim=1``; a tensor with fewer than 2 dims is
    one row), ``r`` = 1-based rank of ``|x|`` ascending, ``m`` = row length:
    ``p = (density - epsilon) + (r - 1) / (m - 1) * 2 * epsilon``, i.e. spread linearly
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).
    ``rank_axis`` is the per-model axis ranked over (1 = mergekit on torch layout; pass
    0 for a Flax ``(in, out)`` kernel to rank within the same rows as mergekit does on
    the torch ``(out, in)`` weight). A row of length 1 gets ``p = density`` (mergekit
    would divide by zero). Ties are ranked by index (stable sort).
    """
    d = stacked(deltas, "deltas")
    n_models = d.shape[0]
    dens = jnp.asarray(per_model(density, n_models, "density"), F32)
    eps = jnp.asarray(per_model(epsilon, n_models, "epsilon"), F32)
    mag = jnp.abs(d)
    if d.ndim - 1 < 2:
        rows = mag.reshape(n_models, 1, -1)
    else:
        axis = rank_axis % (d.ndim - 1) + 1
        rows = jnp.moveaxis(mag, axis, -1)
    m = rows.shape[-1]
    rank = _ranks(rows, descending=False).astype(F32)
    rank_norm = rank / (m - 1) if m > 1 else jnp.full(rows.shape, 0.5, F32)
    probs = bcast(dens - eps, rows.ndim) + rank_norm * bcast(2.0 * eps, rows.ndim)
    if d.ndim - 1 < 2:
        return probs.reshape(d.shape)
    return jnp.moveaxis(probs, -1, axis)


def sparsify_della(
    deltas, density, epsilon, key, rescale: Rescale = True, *, rank_axis: int = 1, uniform=None
) -> jax.Array:
    """DELLA MagPrune: rank-based Bernoulli drop, rescale by ``1 / p`` per element.

    ``p`` from :func:`della_keep_probabilities`; ``m ~ Bernoulli(p)`` elementwise (one
    draw over the full shape); result ``x * m / p`` with ``rescale=True`` (so
    ``E[result] = x``), ``x * m`` with ``rescale=False``, current mergekit's norm
    matching with ``rescale="l1"|"l2"|"linf"``. ``density_i >= 1`` returns the delta
    unchanged, ``density_i <= 0`` gives zeros (mergekit ``della_magprune``). A concrete
    density/epsilon with ``density +/- epsilon`` outside (0, 1) raises like mergekit;
    traced values are not checked (probabilities outside [0, 1] then saturate).
    ``uniform`` replaces the draw as in :func:`sparsify_random`.
    """
    _check_rescale(rescale)
    d = stacked(deltas, "deltas")
    n_models = d.shape[0]
    dens_raw = per_model(density, n_models, "density")
    eps_raw = per_model(epsilon, n_models, "epsilon")
    _validate_della(dens_raw, eps_raw)
    probs = della_keep_probabilities(d, dens_raw, eps_raw, rank_axis=rank_axis)
    keep = _bernoulli(key, probs, d.shape, uniform)
    if rescale is True:
        out = jnp.where(keep, d / jnp.where(keep, probs, 1.0), 0.0)
    elif rescale:
        out = _norm_rescale(d, keep.astype(F32), rescale, _RESCALE_NORM_EPS)
    else:
        out = jnp.where(keep, d, 0.0)
    full = bcast(jnp.asarray(dens_raw >= 1), d.ndim)
    empty = bcast(jnp.asarray(dens_raw <= 0), d.ndim)
    return jnp.where(full, d, jnp.where(empty, 0.0, out))
