"""Interpolation merges in NumPy, one Hugging Face tensor at a time, for the host
executor (:mod:`dem_jax.merge.host`): each computes what the JAX kernel named in its
docstring computes, in float32 (XLA sums whole tensors in another order: results agree
to float32 rounding)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dem_jax.merge.host_kernels import F32, _sum0


def _dot(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    """Σ a·b over ``axis`` (None: everything) in float32, summed pairwise by NumPy (an
    error of about log2(n) roundings, where BLAS's sdot accumulates in lanes)."""
    prod = np.multiply(a, b)
    return F32(prod.sum()) if axis is None else prod.sum(axis=axis)


def linear(models: Sequence[np.ndarray], weights: np.ndarray, normalize: bool) -> np.ndarray:
    """``linear.linear``: ``Σ w_i θ_i``, over ``Σ w_i`` when ``normalize``."""
    w = weights.astype(F32)
    res = _sum0([m * w[i] for i, m in enumerate(models)])
    if normalize:
        res /= _sum0(list(w))
    return res


def slerp(a: np.ndarray, b: np.ndarray, t: float, dot_threshold: float = 0.9995, eps=1e-8):
    """``slerp.slerp``: spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1)."""
    t = F32(t)
    na = np.sqrt(np.dot(a.reshape(-1), a.reshape(-1)).astype(F32))
    nb = np.sqrt(np.dot(b.reshape(-1), b.reshape(-1)).astype(F32))
    an = a / na if na > eps else a
    bn = b / nb if nb > eps else b
    dot = F32(np.clip(np.dot(an.reshape(-1), bn.reshape(-1)), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return s0 * a + s1 * b


def model_stock(base: np.ndarray, models: Sequence[np.ndarray], filter_wise: bool) -> np.ndarray:
    """``model_stock.model_stock`` on one HF tensor (rows = its last axis when
    ``filter_wise``; a 1-D tensor is one row)."""
    n = len(models)
    shape = base.shape
    rows = base.reshape(1, -1) if base.ndim < 2 else base
    w0 = rows if filter_wise else base.reshape(-1)
    ws = [m.reshape(w0.shape) for m in models]
    offsets = [m - w0 for m in ws]
    norms = [np.sqrt(np.einsum("...i,...i->...", o, o)) for o in offsets]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = np.einsum("...i,...i->...", offsets[i], offsets[j])
            cos.append(np.clip(dot / np.maximum(norms[i] * norms[j], F32(1e-6)), -1, 1))
    cos_theta = (_sum0(cos) / F32(len(cos)))[..., None]
    denominator = 1 + (n - 1) * cos_theta
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, F32(0), n * cos_theta / np.where(singular, F32(1), denominator))
    w_avg = _sum0(ws) / F32(n)
    return (t * w_avg + (1 - t) * w0).astype(F32).reshape(shape)


def passthrough(x: np.ndarray, scale: float) -> np.ndarray:
    """``Passthrough.kernel``: the one input, times ``scale`` (1: the input itself)."""
    return x if scale == 1 else x * F32(scale)


def nearswap(base: np.ndarray, x: np.ndarray, t: float) -> np.ndarray:
    """``nearswap.nearswap``: ``w = clip(t / max(|base - x|, 1e-6), 0, 1)``, result
    ``w x + (1 - w) base``."""
    w = np.abs(base - x)
    np.maximum(w, F32(1e-6), out=w)
    np.divide(F32(t), w, out=w)
    np.clip(w, F32(0), F32(1), out=w)
    return w * x + (1 - w) * base


def nuslerp(
    t: float, v0: np.ndarray, v1: np.ndarray, *, row_wise: bool, flatten: bool, eps=1e-8
) -> np.ndarray:
    """``nuslerp.nuslerp``: from ``v0`` (t = 0) to ``v1`` (t = 1) on the sphere, per
    vector: the whole tensor (``flatten``), else its rows, or with ``row_wise`` its
    columns (the vectors along axis 0)."""
    shape = v0.shape
    x, y = v0, v1
    if flatten:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
    elif row_wise:
        x, y = np.swapaxes(x, 0, -1), np.swapaxes(y, 0, -1)
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])

    def unit(v):
        return v / np.maximum(np.sqrt(_dot(v, v, -1)), F32(1e-7))[:, None]

    t = F32(t)
    cos = np.clip(_dot(unit(x), unit(y), -1), F32(-1), F32(1))[:, None]
    colinear = (1 - cos * cos) <= F32(eps) ** 2
    theta = np.arccos(np.where(colinear, F32(0), cos))
    with np.errstate(divide="ignore", invalid="ignore"):  # colinear rows: the other branch
        spherical = (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)
    out = np.where(colinear, (1 - t) * x + t * y, spherical)
    if flatten or not row_wise or len(shape) < 2:
        return out.reshape(shape)
    moved = [shape[-1], *shape[1:-1], shape[0]]  # the shape with axes 0 and -1 swapped
    return np.swapaxes(out.reshape(moved), 0, -1)


def nuslerp_t(w0: float, w1: float) -> np.float32:
    """``nuslerp.nuslerp_t``: ``w1 / (w0 + w1)``, 0.5 when ``|w0 + w1| < 1e-6``."""
    total = F32(w0) + F32(w1)
    return F32(0.5) if abs(total) < 1e-6 else F32(w1) / total


def multislerp(
    models: Sequence[np.ndarray],
    weights: Sequence[float],
    base: np.ndarray | None,
    *,
    normalize_weights: bool,
    eps: float,
) -> np.ndarray:
    """``multislerp.multislerp`` over whole (flattened) tensors."""
    if len(models) == 1:
        return models[0]
    shape = models[0].shape
    flat = [(m - base if base is not None else m).reshape(-1) for m in models]
    w = np.asarray(weights, np.float64).astype(F32)
    if normalize_weights:
        w = w / _sum0(list(w))
    eps = F32(eps)
    norms = [np.sqrt(_dot(x, x)) for x in flat]
    units = [x / (n + eps) for x, n in zip(flat, norms, strict=True)]
    mean = _sum0([u * w[i] for i, u in enumerate(units)])
    mean_norm = np.sqrt(_dot(mean, mean))
    if mean_norm < eps:  # degenerate: the weighted sum (mergekit raises for N > 2)
        out = _sum0([x * w[i] for i, x in enumerate(flat)])
    else:
        mean /= mean_norm
        tangent = _sum0([(u - _dot(u, mean) * mean) * w[i] for i, u in enumerate(units)])
        r = np.sqrt(_dot(tangent, tangent)) + eps
        scale = _sum0([F32(n * w[i]) for i, n in enumerate(norms)])
        out = (mean * np.cos(r) + tangent * (np.sin(r) / r)) * scale
    out = out.reshape(shape)
    return out if base is None else out + base


def karcher(models: Sequence[np.ndarray], max_iter: int, tol: float) -> np.ndarray:
    """``karcher.karcher``: the Karcher mean of the models' directions (equal weights,
    inputs of norm <= ``tol`` left out), scaled by their mean norm; up to ``max_iter``
    steps, stopping when the tangent's norm is below ``tol``."""
    n = len(models)
    if n == 1:
        return models[0]
    shape, flat = models[0].shape, [m.reshape(-1) for m in models]
    tol = F32(tol)
    norms = [np.sqrt(_dot(x, x)) for x in flat]
    units = [np.zeros_like(x) if nr == 0 else x / nr for x, nr in zip(flat, norms, strict=True)]
    valid = [bool(nr > tol) for nr in norms]
    if not any(valid):
        return np.zeros(shape, F32)
    alpha = F32(1.0 / n)
    total = _sum0([alpha if v else F32(0) for v in valid])
    a = [alpha / total if v else F32(0) for v in valid]
    mean = _sum0([a[i] * u for i, u in enumerate(units)])
    mean_norm = np.sqrt(_dot(mean, mean))
    m = units[valid.index(True)] if mean_norm < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        dots = [np.clip(_dot(u, m), F32(-1), F32(1)) for u in units]
        theta = [np.arccos(c) for c in dots]
        coef = [
            a[i] * (th / np.sin(th)) if valid[i] and th >= tol else F32(0)
            for i, th in enumerate(theta)
        ]
        tangent = _sum0([coef[i] * (u - dots[i] * m) for i, u in enumerate(units)])
        t_norm = np.sqrt(_dot(tangent, tangent))
        if t_norm < tol:
            break
        moved = np.cos(t_norm) * m + np.sin(t_norm) * (tangent / t_norm)
        m_norm = np.sqrt(_dot(moved, moved))
        m = moved / m_norm if m_norm > tol else moved
    scale = _sum0([alpha * nr for nr in norms])
    return (scale * m).reshape(shape)
