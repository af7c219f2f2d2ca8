"""Diagnostics of distribution vectors: norms per layer and parameter group, the
cosine matrix between vectors and the rate of sign conflicts."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax.errors import DemError
from dem_jax.io.hf.weights import tensor_maps
from dem_jax.io.tree import get_leaf
from dem_jax.vectors.vector import Vector, check_compatible, group_name


@jax.jit
def _leaf_stats(leaves: list[jax.Array]):
    """Per-leaf sums for the diagnostics; leaves are (L, ...) (a layer axis first)."""
    xs = [a.astype(jnp.float32) for a in leaves]
    axes = tuple(range(1, xs[0].ndim))
    sq = jnp.stack([jnp.sum(x * x, axis=axes) for x in xs])  # (N, L)
    flat = jnp.stack([x.reshape(-1) for x in xs])
    dots = jnp.einsum("ik,jk->ij", flat, flat, precision=jax.lax.Precision.HIGHEST)
    # Across vectors as chains of elementwise ops: XLA:CPU is slow to reduce an outer axis.
    pos = functools.reduce(jnp.logical_or, [x > 0 for x in xs])
    neg = functools.reduce(jnp.logical_or, [x < 0 for x in xs])
    nonzero = functools.reduce(jnp.add, [(x != 0).astype(jnp.int32) for x in xs])
    # Counted per layer so no int32 sum covers more than one layer's elements.
    conflicts = jnp.sum(pos & neg, axis=axes, dtype=jnp.int32)  # (L,)
    compared = jnp.sum(nonzero >= 2, axis=axes, dtype=jnp.int32)  # (L,)
    return sq, dots, conflicts, compared


def vector_diagnostics(vectors: list[Vector], names: list[str] | None = None) -> dict[str, Any]:
    """Norms, cosine similarities and sign conflicts of distribution vectors.

    * ``norms[name]``: ``total`` L2 norm; ``layers``: L2 norm of each decoder layer
      (all its parameters); ``groups``: L2 norm of each parameter group (HF name
      without the layer prefix, e.g. ``self_attn.q_proj.weight``, summed over layers).
    * ``cosine``: N × N matrix of cosine similarities over all parameters
      (0 where a vector is all zeros).
    * ``sign_conflict``: an element is *compared* where at least two vectors are
      non-zero, and *conflicting* where among those some are positive and some
      negative; ``rate`` = conflicting / compared (``None`` when nothing is
      compared, e.g. for one vector), overall and per group.

    Computed leaf by leaf under jit on the vectors' shardings; only scalars and
    per-layer sums come back to the host.
    """
    if not vectors:
        raise DemError("vector_diagnostics: no vectors given")
    names = list(names or [v.name or f"vector{i}" for i, v in enumerate(vectors)])
    if len(names) != len(vectors) or len(set(names)) != len(names):
        raise DemError(f"vector_diagnostics: need one distinct name per vector, got {names}")
    ref = vectors[0].config
    for name, v in zip(names[1:], vectors[1:], strict=True):
        check_compatible(ref, v.config, names[0], name)

    n, n_layers = len(vectors), ref.num_layers
    layer_sq = np.zeros((n, n_layers))
    group_sq: dict[str, np.ndarray] = {}
    dots = np.zeros((n, n))
    group_conf: dict[str, list[int]] = {}
    for tmap in tensor_maps(ref):
        leaves = [get_leaf(v.params, tmap.path) for v in vectors]
        if not tmap.stacked:
            leaves = [a[None] for a in leaves]
        sq, d, conf, comp = jax.device_get(_leaf_stats(leaves))
        sq = np.asarray(sq, np.float64)
        if tmap.stacked:
            layer_sq += sq
        group_sq[group_name(tmap)] = sq.sum(axis=1)
        dots += np.asarray(d, np.float64)
        group_conf[group_name(tmap)] = [
            int(np.sum(conf, dtype=np.int64)),
            int(np.sum(comp, dtype=np.int64)),
        ]

    total_sq = np.diag(dots)
    norms = np.sqrt(total_sq)
    denom = np.outer(norms, norms)
    cosine = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    conflicting = sum(c for c, _ in group_conf.values())
    compared = sum(c for _, c in group_conf.values())

    def rate(c: int, m: int) -> float | None:
        return c / m if m else None

    return {
        "names": names,
        "num_params": int(
            sum(math.prod(get_leaf(vectors[0].params, tm.path).shape) for tm in tensor_maps(ref))
        ),
        "norms": {
            name: {
                "total": float(norms[i]),
                "layers": [float(x) for x in np.sqrt(layer_sq[i])],
                "groups": {g: float(np.sqrt(s[i])) for g, s in group_sq.items()},
            }
            for i, name in enumerate(names)
        },
        "cosine": [[float(x) for x in row] for row in cosine],
        "sign_conflict": {
            "rate": rate(conflicting, compared),
            "conflicting": conflicting,
            "compared": compared,
            "groups": {g: rate(c, m) for g, (c, m) in group_conf.items()},
        },
    }


def format_diagnostics(diag: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`vector_diagnostics`' result."""
    names = diag["names"]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'vector':<{width}}  {'L2 norm':>10}  per-layer L2 norms"]
    for name in names:
        entry = diag["norms"][name]
        layers = " ".join(f"{x:.3g}" for x in entry["layers"])
        lines.append(f"{name:<{width}}  {entry['total']:>10.4g}  {layers}")
    lines.append("cosine similarity:")
    lines.append(" " * width + "  " + " ".join(f"{n[:8]:>8}" for n in names))
    for name, row in zip(names, diag["cosine"], strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{x:>8.4f}" for x in row))
    sc = diag["sign_conflict"]
    if sc["rate"] is None:
        lines.append("sign conflicts: none compared (need two non-zero vectors)")
    else:
        lines.append(
            f"sign conflicts: {sc['rate']:.4f} ({sc['conflicting']} of {sc['compared']} "
            "elements where two or more vectors are non-zero)"
        )
    return "\n".join(lines)
