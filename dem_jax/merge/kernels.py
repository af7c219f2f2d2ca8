"""Merge-method math on single tensors, as jit-able JAX functions.

Every function here is pure ``jax.numpy``: no I/O, no Python control flow on traced
values, float32 arithmetic, float32 result (the caller casts to the output dtype).

Conventions
-----------
* ``base`` is one parameter tensor; ``models`` / ``deltas`` are the N fine-tuned
  tensors (or their task vectors ``model - base``) stacked on a leading axis, shape
  ``(N, *param_shape)``, so a whole merge is one vectorised op.
* Per-model scalars (weight, density, gamma, epsilon) are arrays of shape ``(N,)``; a
  scalar is broadcast to every model.
* Random methods take a ``jax.random`` key and draw over the full stacked shape with
  ``jax.random`` (the result does not depend on how the tensor is sharded).
* No float32 matmul / einsum is used for reductions (they may run in TF32 on GPUs);
  sums are elementwise products reduced with ``jnp.sum`` (over the model axis: a
  chain of adds, see ``_sum0``).

Which mergekit (arcee-ai/mergekit) definition each function follows
--------------------------------------------------------------------
The reference is mergekit 0.1.5 (the version the parity tests run); function and
file names below are that version's.
==========================  ==============================================================
function                    mergekit source
==========================  ==============================================================
sparsify_magnitude          ``mergekit/sparsify.py::magnitude`` (TIES trim)
sparsify_random             ``mergekit/sparsify.py::bernoulli`` (DARE)
sparsify_breadcrumbs        ``mergekit/sparsify.py::magnitude_outliers``
sparsify_della              ``mergekit/sparsify.py::della_magprune`` (earlier named
                            ``rank_magnitude`` / ``rank_magnitude_sampling``)
della_keep_probabilities    the probability step of ``della_magprune``
sign_consensus              ``mergekit/merge_methods/generalized_task_arithmetic.py::get_mask``
generalized_task_arithmetic ``generalized_task_arithmetic.py::GTATask.execute``
task_arithmetic, ties,      ``mergekit/merge_methods/registry.py`` (``STATIC_MERGE_METHODS``)
dare_linear, dare_ties,     for consensus / sparsification / default ``normalize`` and
breadcrumbs,                ``rescale``; ``GeneralizedTaskArithmeticMerge.parameters`` and
breadcrumbs_ties, della,    ``tensor_parameters`` for ``density=1.0``, ``gamma=0.01``,
della_linear                ``epsilon=0.15``, ``lambda=1.0``
linear                      ``mergekit/merge_methods/linear.py::LinearMergeTask``
slerp                       ``mergekit/merge_methods/slerp.py::slerp``
model_stock                 ``mergekit/merge_methods/model_stock.py::model_stock_merge_method``
parameter_selection         not in mergekit: parameter-selection merging (Ju et al. 2024)
==========================  ==============================================================

Named-method defaults (``registry.py``)::

    method            consensus  sparsification      normalize  rescale
    task_arithmetic   -          -                   False      False
    ties              sum        magnitude           True       False
    dare_ties         sum        random              False      True
    dare_linear       -          random              False      True
    breadcrumbs       -          magnitude_outliers  False      False
    breadcrumbs_ties  sum        magnitude_outliers  False      False
    della             sum        della_magprune      True       True
    della_linear      -          della_magprune      False      True

Rescaling (the ``rescale`` argument)
-------------------------------------
mergekit 0.1.5 maps ``rescale: true`` to ``RescaleNorm.l1`` for *every* sparsifier
(DARE and DELLA included): the masked delta is scaled so its L1 norm equals the
unmasked one (``rescaled_masked_tensor``, skipped when either norm is < 1e-7). That is
``rescale="l1"`` here, and what :mod:`dem_jax.merge` passes for a mergekit
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
``rescale=False`` keeps the masked values as they are. ``lam`` is current mergekit's
global ``lambda`` (default 1.0) for every method; the first mergekit DELLA version read
a per-model ``lambda`` (from the first model) for DELLA only.

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

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax.errors import DemError

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_keep_probabilities",
    "della_linear",
    "generalized_task_arithmetic",
    "linear",
    "model_stock",
    "parameter_selection",
    "sign_consensus",
    "slerp",
    "sparsify_breadcrumbs",
    "sparsify_della",
    "sparsify_magnitude",
    "sparsify_random",
    "task_arithmetic",
    "ties",
]

Rescale = bool | Literal["l1", "l2", "linf"] | None
Sparsify = Literal["magnitude", "random", "breadcrumbs", "della"] | None
Consensus = Literal["sum", "count"] | None

_F32 = jnp.float32
_NORMS = ("l1", "l2", "linf")
# mergekit's thresholds: rescale_sum (boolean-rescale API) and rescaled_masked_tensor.
_RESCALE_SUM_EPS = 1e-8
_RESCALE_NORM_EPS = 1e-7
# mergekit parameter defaults (GeneralizedTaskArithmeticMerge.tensor_parameters).
DEFAULT_DENSITY = 1.0
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15


# --------------------------------------------------------------------------- helpers


def _f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=_F32)


def _stacked(x, name: str) -> jax.Array:
    arr = _f32(x)
    if arr.ndim < 1:
        raise DemError(f"{name} must be stacked with a leading model axis, got a scalar")
    return arr


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _per_model(value, n_models: int, default: float, name: str):
    """(N,) per-model parameter: float64 NumPy when concrete, float32 jax when traced."""
    if value is None:
        value = default
    if _is_concrete(value):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, n_models)):
            raise DemError(f"{name} must be a scalar or have shape ({n_models},), got {arr.shape}")
        return np.broadcast_to(arr.reshape(-1) if arr.ndim else arr, (n_models,))
    arr = jnp.asarray(value, dtype=_F32)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, n_models)):
        raise DemError(f"{name} must be a scalar or have shape ({n_models},), got {arr.shape}")
    return jnp.broadcast_to(arr.reshape(-1) if arr.ndim else arr, (n_models,))


def _count(frac, numel: int) -> jax.Array:
    """mergekit's ``int(frac * numel)`` per model, as int32 (host float64 when concrete)."""
    if isinstance(frac, np.ndarray):
        k = np.trunc(frac * numel)
        return jnp.asarray(np.clip(k, -(2**31), 2**31 - 1).astype(np.int32))
    return jnp.trunc(frac * _F32(numel)).astype(jnp.int32)


def _bcast(v, ndim: int) -> jax.Array:
    """(N,) -> (N, 1, ..., 1) so it broadcasts against an (N, *shape) array."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _sum0(x: jax.Array) -> jax.Array:
    """Sum over the leading (model) axis as a chain of elementwise adds, in model order.

    XLA:CPU reduces over an outer axis some 40x slower than it adds arrays, and N is
    small; the order ((x0 + x1) + x2) ... is also torch's for mergekit's ``sum(dim=0)``.
    """
    out = x[0]
    for i in range(1, x.shape[0]):
        out = out + x[i]
    return out


_KEY_MAX = 0x7FFFFFFF  # the largest int32: reverses the order of non-negative keys


def _largest(mag: jax.Array, k) -> jax.Array:
    """Boolean mask of the ``k[i]`` largest entries of each ``mag[i]`` (non-negative);
    among equal values the lower flat index is taken first, as a stable descending
    sort orders them. ``k`` is ``(N,)`` int."""
    return _top_keys(jax.lax.bitcast_convert_type(mag.astype(_F32), jnp.int32), k)


def _smallest(mag: jax.Array, k) -> jax.Array:
    """Mask of the ``k[i]`` smallest entries of each ``mag[i]``, lower index first (the
    order of a stable ascending sort)."""
    bits = jax.lax.bitcast_convert_type(mag.astype(_F32), jnp.int32)
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
    return masked * _bcast(scale, delta.ndim)


def _bernoulli(key, p, shape, uniform) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, or the same from pre-drawn uniforms."""
    if uniform is not None:
        return _f32(uniform) < p
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
    d = _stacked(deltas, "deltas")
    n_models, numel = d.shape[0], math.prod(d.shape[1:])
    dens = _per_model(density, n_models, DEFAULT_DENSITY, "density")
    dens_arr = jnp.asarray(dens)
    k = jnp.where(dens_arr > 0, jnp.maximum(_count(dens, numel), 1), 0)
    mask = _largest(jnp.abs(d), k).astype(_F32)
    out = _deterministic_rescale(d, mask, rescale)
    return jnp.where(_bcast(dens_arr >= 1, d.ndim), d, out)


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
    d = _stacked(deltas, "deltas")
    dens_raw = _per_model(density, d.shape[0], DEFAULT_DENSITY, "density")
    p = _bcast(jnp.asarray(dens_raw, _F32), d.ndim)
    keep = _bernoulli(key, p, d.shape, uniform)
    if rescale is True:
        out = jnp.where(keep, d / jnp.where(p > 0, p, 1.0), 0.0)
    elif rescale:
        out = _norm_rescale(d, keep.astype(_F32), rescale, _RESCALE_NORM_EPS)
    else:
        out = jnp.where(keep, d, 0.0)
    return jnp.where(_bcast(jnp.asarray(dens_raw >= 1), d.ndim), d, out)


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
    d = _stacked(deltas, "deltas")
    n_models, numel = d.shape[0], math.prod(d.shape[1:])
    dens = _per_model(density, n_models, DEFAULT_DENSITY, "density")
    gam = _per_model(gamma, n_models, DEFAULT_GAMMA, "gamma")
    target = _count(dens, numel)
    n_top = _count(gam, numel)
    n_bot = numel - target - n_top
    n_top = jnp.where(n_bot < 0, n_top + n_bot, n_top)
    n_bot = jnp.maximum(n_bot, 0)
    mag = jnp.abs(d)
    keep = _smallest(mag, numel - n_top) & ~_smallest(mag, n_bot)
    out = _deterministic_rescale(d, keep.astype(_F32), rescale)
    return jnp.where(_bcast(jnp.asarray(dens) >= 1, d.ndim), d, out)


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
    d = _stacked(deltas, "deltas")
    n_models = d.shape[0]
    dens = jnp.asarray(_per_model(density, n_models, DEFAULT_DENSITY, "density"), _F32)
    eps = jnp.asarray(_per_model(epsilon, n_models, DEFAULT_EPSILON, "epsilon"), _F32)
    mag = jnp.abs(d)
    if d.ndim - 1 < 2:
        rows = mag.reshape(n_models, 1, -1)
    else:
        axis = rank_axis % (d.ndim - 1) + 1
        rows = jnp.moveaxis(mag, axis, -1)
    m = rows.shape[-1]
    rank = _ranks(rows, descending=False).astype(_F32)
    rank_norm = rank / (m - 1) if m > 1 else jnp.full(rows.shape, 0.5, _F32)
    probs = _bcast(dens - eps, rows.ndim) + rank_norm * _bcast(2.0 * eps, rows.ndim)
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
    d = _stacked(deltas, "deltas")
    n_models = d.shape[0]
    dens_raw = _per_model(density, n_models, DEFAULT_DENSITY, "density")
    eps_raw = _per_model(epsilon, n_models, DEFAULT_EPSILON, "epsilon")
    _validate_della(dens_raw, eps_raw)
    probs = della_keep_probabilities(d, dens_raw, eps_raw, rank_axis=rank_axis)
    keep = _bernoulli(key, probs, d.shape, uniform)
    if rescale is True:
        out = jnp.where(keep, d / jnp.where(keep, probs, 1.0), 0.0)
    elif rescale:
        out = _norm_rescale(d, keep.astype(_F32), rescale, _RESCALE_NORM_EPS)
    else:
        out = jnp.where(keep, d, 0.0)
    full = _bcast(jnp.asarray(dens_raw >= 1), d.ndim)
    empty = _bcast(jnp.asarray(dens_raw <= 0), d.ndim)
    return jnp.where(full, d, jnp.where(empty, 0.0, out))


# -------------------------------------------------------------------- sign consensus


def sign_consensus(deltas, weights=None, method: Literal["sum", "count"] = "sum") -> jax.Array:
    """TIES elect: boolean mask of the entries that agree with the majority sign.

    mergekit ``get_mask`` on the weighted deltas ``y_i = w_i * x_i``:
    ``"sum"``: ``s = +1 if sum_i y_i >= 0 else -1`` (mass-weighted, the TIES paper);
    ``"count"``: ``s = +1 if sum_i sign(y_i) >= 0 else -1``.
    ``mask_i = (sign(y_i) == s)``; zero entries are never in the mask.
    ``weights=None`` means all ones.
    """
    d = _stacked(deltas, "deltas")
    if weights is not None:
        d = d * _bcast(_f32(weights), d.ndim)
    sign = jnp.sign(d)
    if method == "sum":
        total = _sum0(d)
    elif method == "count":
        total = _sum0(sign)
    else:
        raise DemError(f'unknown consensus method "{method}"; expected "sum" or "count"')
    majority = jnp.where(total >= 0, 1.0, -1.0)
    return sign == majority


# ------------------------------------------------------------ the one GTA engine


def generalized_task_arithmetic(
    base,
    deltas,
    weights,
    *,
    sparsify: Sparsify = None,
    consensus: Consensus = None,
    densities=None,
    gammas=None,
    epsilons=None,
    key=None,
    normalize: bool = False,
    rescale: Rescale = True,
    lam=1.0,
    rank_axis: int = 1,
) -> jax.Array:
    """mergekit's generalized task arithmetic (``GTATask.execute``).

    1. sparsify each task vector ``x_i`` (``"magnitude"`` TIES / ``"random"`` DARE /
       ``"breadcrumbs"`` / ``"della"``; ``None`` keeps it) with its density (default
       1.0), gamma (0.01), epsilon (0.15), and ``rescale``;
    2. ``y_i = w_i * x_i``;
    3. with ``consensus``: ``M_i = sign_consensus(...)``, ``Δ = Σ_i M_i y_i``,
       ``D = Σ_i M_i w_i`` with ``D = 1`` where ``D == 0``;
       without: ``Δ = Σ_i y_i``, ``D = Σ_i w_i`` with ``D = 1`` where ``|D| < 1e-8``;
    4. ``Δ /= D`` if ``normalize``;
    5. result ``base + lam * Δ``.

    DEM is ``sparsify=None, consensus=None, normalize=False`` with free weights.
    ``key`` is required for ``"random"`` and ``"della"``. ``rank_axis`` is DELLA's.
    """
    b = _f32(base)
    d = _stacked(deltas, "deltas")
    if d.shape[1:] != b.shape:
        raise DemError(f"deltas shape {d.shape} does not stack base shape {b.shape}")
    n_models = d.shape[0]
    if n_models == 0:
        return b
    _check_rescale(rescale)
    w = jnp.asarray(_per_model(weights, n_models, 1.0, "weights"), _F32)

    if sparsify is not None:
        if sparsify in ("random", "della") and key is None:
            raise DemError(f'sparsify="{sparsify}" needs a jax.random key')
        if sparsify == "magnitude":
            d = sparsify_magnitude(d, densities if densities is not None else 1.0, rescale=rescale)
        elif sparsify == "random":
            d = sparsify_random(d, densities if densities is not None else 1.0, key, rescale)
        elif sparsify == "breadcrumbs":
            d = sparsify_breadcrumbs(
                d,
                densities if densities is not None else DEFAULT_DENSITY,
                gammas if gammas is not None else DEFAULT_GAMMA,
                rescale=rescale,
            )
        elif sparsify == "della":
            d = sparsify_della(
                d,
                densities if densities is not None else DEFAULT_DENSITY,
                epsilons if epsilons is not None else DEFAULT_EPSILON,
                key,
                rescale,
                rank_axis=rank_axis,
            )
        else:
            raise DemError(
                f"unknown sparsification {sparsify!r}; expected magnitude, random, "
                "breadcrumbs or della"
            )

    wb = _bcast(w, d.ndim)
    weighted = d * wb
    if consensus is not None:
        mask = sign_consensus(weighted, None, consensus).astype(_F32)
        mixed = _sum0(weighted * mask)
        divisor = _sum0(wb * mask)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = _sum0(weighted)
        divisor = jnp.sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return b + mixed * _f32(lam)


# ------------------------------------------------------------------ named methods


def task_arithmetic(base, deltas, weights, *, normalize: bool = False, lam=1.0) -> jax.Array:
    """Task arithmetic (DEM): ``base + lam * Σ_i w_i x_i`` (÷ ``Σ w_i`` if normalize)."""
    return generalized_task_arithmetic(base, deltas, weights, normalize=normalize, lam=lam)


def ties(
    base,
    deltas,
    weights,
    densities=None,
    *,
    normalize: bool = True,
    rescale: Rescale = False,
    lam=1.0,
) -> jax.Array:
    """TIES: magnitude trim -> sum-sign elect -> disjoint (weight-normalised) mean."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="magnitude",
        consensus="sum",
        densities=densities,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
    )


def dare_linear(
    base,
    deltas,
    weights,
    densities=None,
    *,
    key,
    normalize: bool = False,
    rescale: Rescale = True,
    lam=1.0,
) -> jax.Array:
    """DARE without sign consensus: ``base + lam * Σ_i w_i (x_i ⊙ m_i / density_i)``."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="random",
        densities=densities,
        key=key,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
    )


def dare_ties(
    base,
    deltas,
    weights,
    densities=None,
    *,
    key,
    normalize: bool = False,
    rescale: Rescale = True,
    lam=1.0,
) -> jax.Array:
    """DARE drop-and-rescale followed by TIES sum-sign consensus."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="random",
        consensus="sum",
        densities=densities,
        key=key,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
    )


def breadcrumbs(
    base,
    deltas,
    weights,
    densities=None,
    gammas=None,
    *,
    normalize: bool = False,
    rescale: Rescale = False,
    lam=1.0,
) -> jax.Array:
    """Model Breadcrumbs (outlier + small-value pruning), no sign consensus."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="breadcrumbs",
        densities=densities,
        gammas=gammas,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
    )


def breadcrumbs_ties(
    base,
    deltas,
    weights,
    densities=None,
    gammas=None,
    *,
    normalize: bool = False,
    rescale: Rescale = False,
    lam=1.0,
) -> jax.Array:
    """Model Breadcrumbs pruning followed by TIES sum-sign consensus."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="breadcrumbs",
        consensus="sum",
        densities=densities,
        gammas=gammas,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
    )


def della(
    base,
    deltas,
    weights,
    densities=None,
    epsilons=None,
    *,
    key,
    normalize: bool = True,
    rescale: Rescale = True,
    lam=1.0,
    rank_axis: int = 1,
) -> jax.Array:
    """DELLA: MagPrune (rank-based drop, ``1/p`` rescale) + TIES sum-sign consensus."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="della",
        consensus="sum",
        densities=densities,
        epsilons=epsilons,
        key=key,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
        rank_axis=rank_axis,
    )


def della_linear(
    base,
    deltas,
    weights,
    densities=None,
    epsilons=None,
    *,
    key,
    normalize: bool = False,
    rescale: Rescale = True,
    lam=1.0,
    rank_axis: int = 1,
) -> jax.Array:
    """DELLA MagPrune without sign consensus."""
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        sparsify="della",
        densities=densities,
        epsilons=epsilons,
        key=key,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
        rank_axis=rank_axis,
    )


# ------------------------------------------------------------------ other methods


def linear(models, weights, normalize: bool = True) -> jax.Array:
    """Weighted average of the models themselves (mergekit ``linear``).

    ``Σ_i w_i θ_i``, divided by ``Σ_i w_i`` when ``normalize`` (mergekit's default).
    As in mergekit there is no guard: weights summing to 0 give inf/nan.
    """
    m = _stacked(models, "models")
    w = jnp.asarray(_per_model(weights, m.shape[0], 1.0, "weights"), _F32)
    wb = _bcast(w, m.ndim)
    res = _sum0(wb * m)
    if normalize:
        res = res / jnp.sum(w)
    return res


def slerp(a, b, t, dot_threshold: float = 0.9995, eps: float = 1e-8) -> jax.Array:
    """Spherical interpolation from ``a`` (mergekit's base model, t=0) to ``b`` (t=1).

    On flattened copies: ``â = a/|a|`` if ``|a| > eps`` else ``a`` (same for ``b``),
    ``c = Σ â ⊙ b̂``. If ``|c| > dot_threshold`` (near parallel or antiparallel) the
    result is ``lerp = (1-t) a + t b``; otherwise with ``θ = arccos(c)``:
    ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b`` (on the unnormalised tensors, as
    mergekit does). The branch is a ``jnp.where``.
    """
    x = _f32(a)
    y = _f32(b)
    if x.shape != y.shape:
        raise DemError(f"slerp needs equal shapes, got {x.shape} and {y.shape}")
    t = _f32(t)
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


def model_stock(base, models, *, filter_wise: bool = False) -> jax.Array:
    """Model Stock (mergekit ``model_stock``) for N >= 2 fine-tunes.

    Offsets ``x_i = θ_i - θ_0``; ``cos_ij = (x_i·x_j) / max(|x_i||x_j|, 1e-6)`` clamped
    to [-1, 1]; ``cos`` = mean over pairs ``i < j``; ``t = N cos / (1 + (N-1) cos)``;
    result ``t · mean_i θ_i + (1 - t) · θ_0``. Dot products are over the whole tensor,
    or per row (last axis; a 1-D tensor is one row) with ``filter_wise=True``.
    As in mergekit 0.1.5, where ``|1 + (N-1) cos| < 1e-6`` (no finite estimate) ``t = 0``
    and the base is kept.
    """
    w0 = _f32(base)
    ws = _stacked(models, "models")
    n_models = ws.shape[0]
    if n_models < 2:
        raise DemError(f"model_stock needs at least 2 fine-tuned models, got {n_models}")
    if ws.shape[1:] != w0.shape:
        raise DemError(f"models shape {ws.shape} does not stack base shape {w0.shape}")
    out_shape = w0.shape
    if filter_wise:
        if w0.ndim < 2:
            w0 = w0.reshape(1, -1)
            ws = ws.reshape(n_models, 1, -1)
    else:
        w0 = w0.reshape(-1)
        ws = ws.reshape(n_models, -1)
    offsets = ws - w0
    norms = jnp.sqrt(jnp.sum(offsets * offsets, axis=-1))
    cos_thetas = []
    for i in range(n_models):
        for j in range(i + 1, n_models):
            dot = jnp.sum(offsets[i] * offsets[j], axis=-1)
            denom = jnp.maximum(norms[i] * norms[j], 1e-6)
            cos_thetas.append(jnp.clip(dot / denom, -1.0, 1.0))
    cos_theta = jnp.mean(jnp.stack(cos_thetas), axis=0)[..., None]
    denominator = 1 + (n_models - 1) * cos_theta
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0.0, (n_models * cos_theta) / jnp.where(singular, 1.0, denominator))
    w_avg = _sum0(ws) / n_models
    return (t * w_avg + (1 - t) * w0).reshape(out_shape)


def parameter_selection(models, key, *, uniform=None) -> jax.Array:
    """Parameter-selection merging (Ju et al. 2024): each element from a random model.

    ``j ~ Uniform{0..N-1}`` independently per element (one ``jax.random.randint`` draw
    over the full parameter shape); result ``θ[j, ...]`` elementwise. With ``uniform``
    (pre-drawn U[0, 1) values of the parameter's shape) ``j = floor(N u)`` instead.
    """
    m = _stacked(models, "models")
    if uniform is None:
        idx = jax.random.randint(key, m.shape[1:], 0, m.shape[0])
    else:
        idx = jnp.clip(jnp.floor(_f32(uniform) * m.shape[0]), 0, m.shape[0] - 1).astype(jnp.int32)
    return jnp.take_along_axis(m, idx[None], axis=0)[0]
