"""Merges that keep or weigh entries by a statistic of the models' changes, in NumPy
for the host executor (:mod:`dem_jax.merge.host`): SCE, RAM / RAM+ and Arcee Fusion,
each computing what the JAX kernel named in its docstring computes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dem_jax.merge.host_kernels import F32, _sum0, top_k_mask


def sce(base: np.ndarray, deltas: Sequence[np.ndarray], select_topk: float) -> np.ndarray:
    """``sce.sce`` on task vectors (overwritten): keep the ``select_topk`` fraction of
    entries of largest variance across the models (``int(nonzero · frac)`` of them,
    equal variances taken in flat order), weigh each task vector by its mean square over
    their sum, erase entries against the majority sign, and add
    ``Σ_i w_i M_i d_i / max(Σ_i w_i M_i, 1e-6)`` to the base."""
    n, frac = len(deltas), F32(select_topk)
    if frac < 1:
        keep = np.zeros(base.shape, bool)
        if frac > 0:
            mean = _sum0(deltas) / F32(n)  # jnp.var: the mean, then the mean square
            var = _sum0([np.square(d - mean) for d in deltas]) / F32(n)
            k = int(np.trunc(F32(np.count_nonzero(var)) * frac))
            keep = top_k_mask(var, k)
        for d in deltas:
            np.multiply(d, keep, out=d)
    power = [np.float64(np.dot(d.reshape(-1), d.reshape(-1))) / d.size for d in deltas]
    total = sum(power)
    w = [F32(1 / n) if abs(total) < 1e-6 else F32(p / total) for p in power]
    s = np.where(_sum0(deltas) >= 0, F32(1), F32(-1))
    mixed, divisor = np.zeros_like(base), np.zeros_like(base)
    for i, d in enumerate(deltas):
        wm = (np.sign(d) == s) * w[i]  # w_i M_i
        mixed += d * wm
        divisor += wm
    return base + mixed / np.maximum(divisor, F32(1e-6))


def ram(
    base: np.ndarray,
    deltas: Sequence[np.ndarray],
    epsilon: float,
    r: float | None = None,
    alpha: float = 0.2,
) -> np.ndarray:
    """``ram.ram``: ``base + Σ_i x_i [|x_i| > ε] (u + o / max(c, 1))``, ``c`` how many
    models changed an entry by more than ε, ``u = [c == 1]``, ``o = [c > 1]``; with
    ``r`` (RAM+) model i's unique part times ``1 + r clip(S_i / max(U_i, ε), 0, alpha)``
    (its counts of shared and unique changed entries)."""
    eps = F32(epsilon)
    changed = [np.abs(d) > eps for d in deltas]
    counts = np.zeros(base.shape, np.int32)
    for c in changed:
        counts += c
    overlap, unique = counts > 1, counts == 1
    divisor = np.maximum(counts, 1).astype(F32)
    parts = []
    for d, c in zip(deltas, changed, strict=True):
        kept = d * c
        unique_part = kept * unique
        if r is not None:
            shared_n = F32(np.count_nonzero(c & overlap))
            unique_n = F32(np.count_nonzero(c & unique))
            rho = shared_n / np.maximum(unique_n, eps)
            unique_part = unique_part * (1 + F32(r) * np.clip(rho, F32(0), F32(alpha)))
        parts.append(unique_part + kept * overlap / divisor)
    return base + _sum0(parts)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def arcee_fusion(base: np.ndarray, model: np.ndarray) -> np.ndarray:
    """``arcee_fusion.arcee_fusion`` (rows along the last axis): importance ``|m - b| ·
    KL(p ‖ q)`` (p, q the row softmaxes of model and base, plus 1e-8); the model's
    change kept where it reaches ``median + 1.5 (q3 - q1)``, the quantiles exact,
    ``sorted[int(q · (numel - 1))]``."""
    p = _softmax(model) + F32(1e-8)
    q = _softmax(base) + F32(1e-8)
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    importance = np.abs(model - base) * kl
    flat, last = importance.reshape(-1), F32(importance.size - 1)
    at = [int(F32(q) * last) for q in (0.25, 0.5, 0.75)]
    q1, median, q3 = np.partition(flat, at)[at]
    keep = importance >= median + F32(1.5) * (q3 - q1)
    return base + (model - base) * keep
