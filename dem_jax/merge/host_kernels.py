"""Merge math in NumPy, one Hugging Face tensor at a time, for the host executor
(:mod:`dem_jax.merge.host`).

Each function computes what the JAX kernel named in its docstring computes for one
HF tensor: the same formulas in float32, model sums in the same order (``((x0 + x1)
+ x2)``, as :func:`dem_jax.merge.arrays.sum0`), the same counts (float64
``int(density * numel)``) and tie rules (equal magnitudes taken in flat-index
order). Whole-tensor reductions (L1 norms, dot products) are summed in another
order than XLA's, so results agree to float32 rounding, not bit for bit;
``tests/test_merge_host.py`` compares the two executors on every method here.

The top-k selection is NumPy's ``partition`` (introselect, O(n)) where the JAX
kernel runs a radix select: XLA:CPU has no fast selection and a sort shards badly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

F32 = np.float32
_CHUNK = 1 << 16  # elements per step: a step's temporaries stay in the core's L2 cache
_RESCALE_NORM_EPS = 1e-7  # mergekit's rescaled_masked_tensor (see dem_jax.merge.sparsify)


# ------------------------------------------------------------------ bfloat16 bits


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (their uint16 bit patterns) as float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(F32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (to nearest, ties to even; NaN stays a quiet NaN of
    the same sign), as uint16 bit patterns: what ``x.astype(ml_dtypes.bfloat16)`` and
    XLA's convert give, without importing ml_dtypes (0.6 s)."""
    u = np.ascontiguousarray(x, F32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to ``dtype`` and back (mergekit rounds inputs to the merge's
    ``dtype`` on load)."""
    if dtype == "float32":
        return x
    if dtype == "bfloat16":
        return bf16_to_f32(f32_to_bf16(x))
    return x.astype(np.float16).astype(F32)


# ------------------------------------------------------------------ selection

_SAMPLE_STEP = 16  # selection narrows to a band found on every 16th element first


def kth_largest(keys: np.ndarray, k: int) -> int:
    """The ``k``-th largest of the non-negative int32 ``keys`` (1 <= k <= n); see
    :func:`kth_largest_counts`."""
    return kth_largest_counts(keys, k)[0]


def kth_largest_counts(keys: np.ndarray, k: int) -> tuple[int, int, int]:
    """(v, count of keys > v, count of keys == v) for ``v`` the ``k``-th largest of the
    non-negative int32 ``keys`` (1 <= k <= n).

    ``np.partition`` of the whole tensor costs ~9 ns an element. Instead a band
    around the k-th value is read off a strided sample, the elements above it
    counted and only the band partitioned; when the band misses (a tensor whose
    sample misleads) the whole tensor is partitioned. The value is exact either way.
    """
    n = keys.size
    if n >= 64 * _SAMPLE_STEP:
        sample = keys[::_SAMPLE_STEP].copy()
        m = sample.size
        expect = k * m / n  # sample elements above the k-th value
        margin = 4 * np.sqrt(expect) + 16
        hi_rank = int(max(0, m - expect - margin))  # ascending ranks in the sample
        lo_rank = int(min(m - 1, m - expect + margin))
        sample.partition([hi_rank, lo_rank])
        lo, hi = sample[hi_rank], sample[lo_rank]
        above = int(np.count_nonzero(keys > hi))
        if lo == hi:  # one value fills the band (bfloat16 deltas repeat magnitudes)
            at = int(np.count_nonzero(keys == lo))
            if above < k <= above + at:
                return int(lo), above, at
        band = keys[(keys >= lo) & (keys <= hi)]
        if above < k <= above + band.size:
            v = int(np.partition(band, band.size - (k - above))[band.size - (k - above)])
            return v, above + int(np.count_nonzero(band > v)), int(np.count_nonzero(band == v))
    v = int(np.partition(keys, n - k)[n - k])
    return v, int(np.count_nonzero(keys > v)), int(np.count_nonzero(keys == v))


def top_k(mag: np.ndarray, k: int) -> Keep:
    """The ``k`` largest entries of non-negative float32 ``mag``, equal values taken
    lower index first (``dem_jax.merge.sparsify.top_k_mask``), as a :data:`Keep`: all
    (None), a key threshold where no tie straddles it, else a mask."""
    n = mag.size
    if k <= 0:
        return np.zeros(mag.shape, bool)
    if k >= n:
        return None
    keys = mag.reshape(-1).view(np.int32)  # a non-negative float's bits order like it
    v, above, at = kth_largest_counts(keys, k)
    if above + at == k:
        return v  # every element at the threshold is kept: a plain comparison
    return Cut(v, _nth_index(keys, v, k - above))


def _nth_index(keys: np.ndarray, v: int, n: int) -> int:
    """The flat index of the ``n``-th (1-based) entry of ``keys`` equal to ``v``, found
    chunk by chunk (no index array of every tie)."""
    for start in range(0, keys.size, _CHUNK):
        eq = keys[start : start + _CHUNK] == v
        count = int(np.count_nonzero(eq))
        if count >= n:
            return start + int(np.flatnonzero(eq)[n - 1])
        n -= count
    raise AssertionError("fewer ties than counted")


def top_k_mask(mag: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k` as a boolean mask."""
    keep = top_k(mag, k)
    if keep is None:
        return np.ones(mag.shape, bool)
    if isinstance(keep, np.ndarray):
        return keep
    return _kept(mag, keep, slice(None)).reshape(mag.shape)


def _count(frac: float, numel: int) -> int:
    """mergekit's ``int(frac * numel)`` (Python float64)."""
    return int(np.clip(np.trunc(frac * numel), -(2**31), 2**31 - 1))


# ------------------------------------------------------------------ sparsifiers
#
# A sparsifier returns what to keep of one model's delta: None (all of it), a key
# threshold (keep |d| >= that float, as int32 bits: no ties to break), a Cut (top k
# with ties split by index), a key range (lo, hi] or a Band (breadcrumbs), or a mask.


@dataclass(frozen=True)
class Cut:
    """Keep keys ``>= v`` at flat indices up to ``last``, ``> v`` after it: the top k
    where the entries equal to the k-th value are taken lower index first."""

    v: int
    last: int


@dataclass(frozen=True)
class Band:
    """Keep keys ``> lo`` (and ``== lo`` after flat index ``lo_last``) and ``< hi`` (and
    ``== hi`` up to flat index ``hi_last``): stable ascending ranks in a range, ties at
    either end split by index."""

    lo: int
    lo_last: int
    hi: int
    hi_last: int


Keep = None | int | Cut | Band | tuple[int, int] | np.ndarray


def magnitude_keep(d: np.ndarray, density: float) -> Keep:
    """TIES trim of one model's delta (``sparsify_magnitude``): keep the
    ``max(1, int(density * numel))`` largest ``|d|`` (none for density <= 0)."""
    if density >= 1:
        return None
    k = max(_count(density, d.size), 1) if density > 0 else 0
    return top_k(np.abs(d), k)


def breadcrumbs_keep(d: np.ndarray, density: float, gamma: float) -> Keep:
    """Model Breadcrumbs (``sparsify_breadcrumbs``): drop the ``int(gamma * n)``
    largest and the smallest so that ``int(density * n)`` remain."""
    if density >= 1:
        return None
    n = d.size
    target, n_top = _count(density, n), _count(gamma, n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    if n_bot >= n:
        return np.zeros(d.shape, bool)
    keys = np.abs(d).reshape(-1).view(np.int32)
    # Kept: stable ascending ranks n_bot .. n - n_top - 1 (lower index, lower rank), so
    # of the entries equal to the bottom value the first are dropped, of those equal to
    # the top value the first are kept.
    lo_v, lo_last = 0, -1
    if n_bot > 0:
        lo_v, above, at = kth_largest_counts(keys, n - n_bot)  # ascending rank n_bot
        dropped = n_bot - (n - above - at)  # of its ties, in index order
        lo_last = _nth_index(keys, lo_v, dropped) if dropped > 0 else -1
    hi_v, hi_last, all_hi = int(np.iinfo(np.int32).max), n, True
    if n_top >= n:  # gamma 1: nothing is kept
        hi_v, hi_last = -1, -1
    elif n_top > 0:
        hi_v, above, at = kth_largest_counts(keys, n_top + 1)  # ascending rank n - n_top - 1
        kept = n - n_top - (n - above - at)  # of its ties, in index order
        all_hi = kept == at
        hi_last = n if all_hi else _nth_index(keys, hi_v, kept)
    if lo_last < 0 and all_hi:  # no ties split: the key range [lo_v, hi_v]
        return (lo_v - 1, hi_v)
    return Band(lo_v, lo_last, hi_v, hi_last)


def random_bits(gen: np.random.BitGenerator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform uint32 values of ``shape``: the generator's raw 64-bit outputs split in
    two (no float conversion on the way)."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = gen.random_raw((n + 1) // 2)
    return raw.view(np.uint32)[:n].reshape(shape)


def uniform_from_bits(bits: np.ndarray) -> np.ndarray:
    """float32 uniforms on [0, 1) from uint32 bits: the top 24 bits times 2^-24 (every
    float32 multiple of 2^-24, equally likely, as ``Generator.random(dtype=float32)``)."""
    u = (bits >> 8).view(np.int32).astype(F32)  # int32 -> float32: one instruction
    u *= F32(2.0**-24)
    return u


def random_keep(d: np.ndarray, density: float, bits: np.ndarray) -> Keep:
    """DARE (``sparsify_random``): keep each entry with probability ``density``, as
    ``bits < floor(density * 2^32)`` on uniform uint32 ``bits`` (exact to 2^-32, finer
    than a float32 uniform's 2^-24)."""
    if density >= 1:
        return None
    threshold = np.uint32(max(0, math.floor(density * 2.0**32)))
    return bits < threshold


def della_keep(d: np.ndarray, density: float, epsilon: float, uniform: np.ndarray) -> Keep:
    """DELLA MagPrune (``sparsify_della`` on the HF tensor): keep each entry with
    probability p = density - epsilon + 2 epsilon r / (m - 1), r the rank of its |d|
    within its row of m (0 the smallest; a 1-D tensor is one row), as ``uniform < p``.

    Without ranking every entry: ``uniform < p`` is ``r > v``, ``v = (uniform - density
    + epsilon) (m - 1) / (2 epsilon)``, and for ``j = floor(v)`` in [0, m - 1) that is
    ``|d| > S[j]``, S the row sorted, when no magnitude repeats in the row (``|d| ==
    S[j]`` is then the entry itself, r = j; keys as int32 bits, so one integer sort per
    row). ``v < 0`` keeps, ``v >= m - 1`` drops. Rows where a non-zero magnitude
    repeats are sorted on 64-bit keys (|d|, column), all distinct, so equal magnitudes
    rank in flat order. A zero delta is dropped (kept or not, it adds nothing).
    """
    if density >= 1:
        return None
    if density <= 0:
        return np.zeros(d.shape, bool)
    m = d.shape[-1] if d.ndim else 1
    rows, u = d.reshape(-1, m), uniform.reshape(-1, m)
    lo, width = F32(density - epsilon), F32(2 * epsilon)
    if m == 1 or width == 0:
        return (u < lo + width * F32(0.5 if m == 1 else 0)).reshape(d.shape) & (d != 0)
    keep = np.empty(rows.shape, bool)
    step = max(1, _CHUNK // m)  # rows at a time: temporaries stay in cache, not paged in
    for r in range(0, rows.shape[0], step):
        keep[r : r + step] = _della_rows(rows[r : r + step], u[r : r + step], lo, width)
    return keep.reshape(d.shape)


def _della_rows(d: np.ndarray, u: np.ndarray, lo: np.float32, width: np.float32) -> np.ndarray:
    """:func:`della_keep` on whole rows ``d`` (2-D, m > 1) with their uniforms ``u``."""
    m = d.shape[-1]
    keys = d.view(np.int32) & 0x7FFFFFFF  # |d| as ordered integers
    v = u - lo
    v *= F32(m - 1) / width
    j = np.maximum(v, 0)  # np.clip costs 4x two plain ufuncs
    np.minimum(j, F32(m - 2), out=j)
    j = j.astype(np.intp)  # floor for v >= 0
    ordered = np.sort(keys, axis=-1)
    repeats = ordered[:, 1:] == ordered[:, :-1]
    repeats &= ordered[:, 1:] != 0  # equal zeros rank no other entry differently
    tied = np.flatnonzero(repeats.any(axis=-1))
    if tied.size * 2 > keys.shape[0]:  # mostly tied (bfloat16 deltas): every row exactly
        packed = _distinct(keys)
        keep = packed > _at_ranks(np.sort(packed, axis=-1), j)
    else:
        keep = keys > _at_ranks(ordered, j)
        if tied.size:
            packed = _distinct(keys[tied])
            keep[tied] = packed > _at_ranks(np.sort(packed, axis=-1), j[tied])
    keep &= v < m - 1
    keep |= v < 0
    keep &= keys != 0
    return keep


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Rows of int32 keys as int64 (key, column): all distinct, in the stable order."""
    packed = keys.astype(np.int64) << 32
    packed |= np.arange(keys.shape[-1], dtype=np.int64)
    return packed


def _at_ranks(ordered: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``ordered[r, j[r, c]]``: each row's sorted keys at the given ranks."""
    rows = np.arange(0, ordered.size, ordered.shape[-1], dtype=np.intp)[:, None]
    return ordered.reshape(-1).take(j + rows)


def _apply(d: np.ndarray, keep: Keep) -> np.ndarray:
    """``d`` with the entries ``keep`` drops zeroed (in place)."""
    if keep is None:
        return d
    return np.multiply(d, _kept(d, keep, slice(None)), out=d)


def _kept(d: np.ndarray, keep: Keep, c: slice) -> np.ndarray | None:
    """Boolean mask of the entries of chunk ``d`` (chunk ``c`` of the delta) to keep."""
    if keep is None or isinstance(keep, np.ndarray):
        return None if keep is None else keep[c]
    bits = d.reshape(-1).view(np.int32) & 0x7FFFFFFF  # |d| on the bits (NaN the largest)
    start = c.start or 0
    if isinstance(keep, Cut):  # >= v up to index `last`: a prefix of this chunk at most
        upto = _prefix(keep.last, start, bits.size)
        out = bits > keep.v
        out[:upto] |= bits[:upto] == keep.v
    elif isinstance(keep, Band):
        upto = _prefix(keep.lo_last, start, bits.size)
        out = bits >= keep.lo
        out[:upto] = bits[:upto] > keep.lo  # ties at lo up to lo_last are dropped
        upto = _prefix(keep.hi_last, start, bits.size)
        below = bits < keep.hi
        below[:upto] |= bits[:upto] == keep.hi  # ties at hi up to hi_last are kept
        out &= below
    elif isinstance(keep, tuple):  # lo < bits <= hi as one unsigned compare (wraps below lo)
        bits -= np.int32(keep[0] + 1)
        out = bits.view(np.uint32) < np.uint32(keep[1] - keep[0])
    else:
        out = bits >= keep
    return out.reshape(d.shape)


def _prefix(last: int, start: int, size: int) -> int:
    """How many entries of a chunk at ``start`` (of ``size``) lie at flat index <= last."""
    return min(max(last + 1 - start, 0), size)


def _l1_scale(d: np.ndarray, keep: Keep) -> np.float32:
    """mergekit's ``rescaled_masked_tensor`` (L1): the factor that gives the kept
    entries the whole delta's L1 norm (1 when either norm is < 1e-7). Both norms in
    one pass of cache-sized chunks (float32 sums per chunk, added in float64)."""
    flat = d.reshape(-1)
    mask = keep.reshape(-1) if isinstance(keep, np.ndarray) else keep
    buf = np.empty(min(_CHUNK, flat.size), F32)
    before = after = 0.0
    for start in range(0, flat.size, _CHUNK):
        c = slice(start, start + _CHUNK)
        a = np.abs(flat[c], out=buf[: flat[c].size])
        before += float(a.sum())
        kept = _kept(flat[c], mask, c)
        if kept is not None:
            np.multiply(a, kept, out=a)
        after += float(a.sum())
    if before >= _RESCALE_NORM_EPS and after >= _RESCALE_NORM_EPS:
        return F32(before / after)
    return F32(1)


# ------------------------------------------------------------------ methods


def task_arithmetic(
    base: np.ndarray,
    deltas: Sequence[np.ndarray],
    weights: np.ndarray,
    *,
    keeps: Sequence[Keep] | None = None,
    rescale: bool = False,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> np.ndarray:
    """``TaskArithmetic.kernel`` on one tensor: each delta sparsified (``keeps``, then
    L1-rescaled with ``rescale``), weighted, then ``task_arithmetic.combine`` with the
    ``"sum"`` sign consensus (TIES) or none; ``deltas`` are overwritten.

    Per element and in the same order as the JAX kernel: ``y_i = w_i d_i``; with
    consensus ``s = +1 if Σ y_i >= 0 else -1``, ``Δ = Σ_i [s y_i > 0] y_i`` (computed
    as ``s Σ_i max(s y_i, 0)``, the same floats) and ``D = Σ_i [s y_i > 0] w_i``
    (1 where 0); without, ``Δ = Σ y_i``, ``D = Σ w_i`` (1 where |D| < 1e-8); ``Δ /= D``
    if ``normalize``; result ``base + λ Δ``. Taken in cache-sized chunks.
    """
    w = np.asarray(weights, np.float64).astype(F32)
    keeps = list(keeps or [None] * len(deltas))
    scales = [
        _l1_scale(d, k) if rescale and k is not None else None
        for d, k in zip(deltas, keeps, strict=True)
    ]
    flat_b = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    masks = [k.reshape(-1) if isinstance(k, np.ndarray) else k for k in keeps]
    out = np.empty_like(flat_b)
    total_w = _sum0(list(w))
    divisor_all = F32(1) if abs(total_w) < 1e-8 else total_w
    # Only plain ufuncs below: NumPy's masked paths (where=, boolean indexing, np.where)
    # cost 1-6 ns an element, a multiply by a boolean 0.3 ns.
    for start in range(0, flat_b.size, _CHUNK):
        c = slice(start, start + _CHUNK)
        ys = []
        for i, d in enumerate(flat):
            y, keep = d[c], _kept(d[c], masks[i], c)
            if keep is not None:
                np.multiply(y, keep, out=y)
            if scales[i] is not None:
                y *= scales[i]
            y *= w[i]
            ys.append(y)
        if consensus:
            # y_i is in the mask where s y_i > 0, s the sign of the total (0 counts as +)
            s = np.greater_equal(_sum0(ys), 0).astype(F32)
            s *= 2
            s -= 1
            mixed = np.zeros_like(s)
            divisor = np.zeros_like(s)
            agree = np.empty(s.shape, bool)
            for i, y in enumerate(ys):
                t = np.multiply(y, s)
                np.greater(t, 0, out=agree)
                mixed += np.multiply(y, agree, out=t)
                divisor += np.multiply(agree, w[i], out=t)
            divisor += divisor == 0
        else:
            mixed, divisor = _sum0(ys), divisor_all
        if normalize:
            mixed /= divisor
        mixed *= F32(lam)
        np.add(flat_b[c], mixed, out=out[c])
    return out.reshape(base.shape)


def _sum0(xs: Sequence) -> np.ndarray:
    """((x0 + x1) + x2) ..., as ``dem_jax.merge.arrays.sum0``."""
    out = np.array(xs[0], F32, copy=True)
    for x in xs[1:]:
        out += x
    return out
