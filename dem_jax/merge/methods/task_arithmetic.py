"""The task-vector family: one engine (sparsify → sign consensus → weighted sum), each
named method a parameterization of it (mergekit's generalized task arithmetic).

DEM itself is ``dem`` (= ``task_arithmetic``): Θ + λ Σ_i ω_i ΔΘ_i with free weights.

mergekit 0.1.5 sources: ``merge_methods/generalized_task_arithmetic.py`` (``GTATask``,
``get_mask``) and ``merge_methods/registry.py`` (``STATIC_MERGE_METHODS``: each name's
sparsifier, consensus and default ``normalize``/``rescale``). Parameter defaults are
``GeneralizedTaskArithmeticMerge.tensor_parameters``: density 1.0, gamma 0.01,
epsilon 0.15, lambda 1.0. Without a sparsifier mergekit still takes ``density`` and
``rescale``; they have no effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dem_jax.errors import DemError
from dem_jax.lazy import jax, jnp
from dem_jax.merge import sparsify as sp
from dem_jax.merge.arrays import F32, bcast, f32, per_model, stacked, sum0
from dem_jax.merge.method import Leaf, MergeMethod, ParamSpec, weight
from dem_jax.merge.tensor_layout import from_hf, to_hf

Consensus = Literal["sum", "count"] | None


def sign_consensus(deltas, weights=None, method: Literal["sum", "count"] = "sum") -> jax.Array:
    """TIES elect: boolean mask of the entries that agree with the majority sign.

    mergekit ``get_mask`` on the weighted deltas ``y_i = w_i * x_i``:
    ``"sum"``: ``s = +1 if sum_i y_i >= 0 else -1`` (mass-weighted, the TIES paper);
    ``"count"``: ``s = +1 if sum_i sign(y_i) >= 0 else -1``.
    ``mask_i = (sign(y_i) == s)``; zero entries are never in the mask.
    ``weights=None`` means all ones.
    """
    d = stacked(deltas, "deltas")
    if weights is not None:
        d = d * bcast(f32(weights), d.ndim)
    sign = jnp.sign(d)
    if method == "sum":
        total = sum0(d)
    elif method == "count":
        total = sum0(sign)
    else:
        raise DemError(f'unknown consensus method "{method}"; expected "sum" or "count"')
    majority = jnp.where(total >= 0, 1.0, -1.0)
    return sign == majority


def combine(
    base, deltas, weights=None, *, consensus: Consensus = None, normalize: bool = False, lam=1.0
) -> jax.Array:
    """Steps 2-5 of ``GTATask.execute`` on (already sparsified) task vectors.

    ``y_i = w_i x_i``; with ``consensus``: ``M_i = sign_consensus(y)``,
    ``Δ = Σ_i M_i y_i``, ``D = Σ_i M_i w_i`` (``D = 1`` where ``D == 0``); without:
    ``Δ = Σ_i y_i``, ``D = Σ_i w_i`` (``D = 1`` where ``|D| < 1e-8``); ``Δ /= D`` if
    ``normalize``; result ``base + lam Δ``. ``weights=None`` means all ones.
    """
    b = f32(base)
    d = stacked(deltas, "deltas")
    if d.shape[1:] != b.shape:
        raise DemError(f"deltas shape {d.shape} does not stack base shape {b.shape}")
    n_models = d.shape[0]
    if n_models == 0:
        return b
    w = jnp.asarray(per_model(1.0 if weights is None else weights, n_models, "weights"), F32)
    wb = bcast(w, d.ndim)
    weighted = d * wb
    if consensus is not None:
        mask = sign_consensus(weighted, None, consensus).astype(F32)
        mixed = sum0(weighted * mask)
        divisor = sum0(wb * mask)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum0(weighted)
        divisor = jnp.sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return b + mixed * f32(lam)


def sparsify(
    kind: str, deltas, values: Mapping[str, Any], rescale, key=None, uniform=None, rank_axis=1
) -> jax.Array:
    """Sparsify stacked ``deltas`` (N, *shape) with sparsifier ``kind``; ``values`` holds
    per-model ``density`` (and ``gamma`` / ``epsilon``). Random kinds draw from ``key``
    or use the pre-drawn ``uniform``."""
    density = values["density"]
    if kind == "magnitude":
        return sp.sparsify_magnitude(deltas, density, rescale=rescale)
    if kind == "breadcrumbs":
        return sp.sparsify_breadcrumbs(deltas, density, values["gamma"], rescale=rescale)
    if key is None and uniform is None:
        raise DemError(f'sparsify="{kind}" needs a jax.random key')
    if kind == "random":
        return sp.sparsify_random(deltas, density, key, rescale, uniform=uniform)
    if kind == "della":
        eps = values["epsilon"]
        return sp.sparsify_della(
            deltas, density, eps, key, rescale, rank_axis=rank_axis, uniform=uniform
        )
    raise DemError(
        f"unknown sparsification {kind!r}; expected magnitude, random, breadcrumbs, della"
    )


@dataclass(frozen=True, kw_only=True)
class TaskArithmetic(MergeMethod):
    """A generalized-task-arithmetic method: a sparsifier and a sign consensus (or none)."""

    sparsifier: str | None = None  # magnitude, random, breadcrumbs, della
    consensus: Consensus = None
    on_deltas: bool = True
    static_flags: tuple[str, ...] = ("normalize", "rescale")

    def merge_tensor(self, base, deltas, weights, *, key=None, uniform=None, **settings):
        """One tensor merged with this method, unset parameters at their defaults.

        ``deltas`` (N, *shape) task vectors, ``weights`` and per-model settings scalars
        or (N,); ``rescale`` as in :mod:`dem_jax.merge.sparsify` (True = the paper's
        per-sparsifier rescaling). ``key`` (or ``uniform``) for random sparsifiers.
        """
        v = self.defaults({"weight": weights, **settings})
        d = stacked(deltas, "deltas")
        if self.sparsifier is not None:
            d = sparsify(self.sparsifier, d, v, v["rescale"], key, uniform)
        return combine(
            base,
            d,
            v["weight"],
            consensus=self.consensus,
            normalize=v["normalize"],
            lam=v["lambda"],
        )

    def check_values(self, values, tensor_names, labels) -> None:
        """mergekit raises unless density ± epsilon lies in (0, 1) (for 0 < density < 1)."""
        if self.sparsifier != "della":
            return
        dens, eps = dict(values.per_model)["density"], dict(values.per_model)["epsilon"]
        for label, drow, erow in zip(labels, dens, eps, strict=True):
            for name, d, e in zip(tensor_names, drow, erow, strict=True):
                concrete = isinstance(d, float) and isinstance(e, float)
                if concrete and 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                    raise DemError(
                        f"{label}: for tensor {name}, density ± epsilon must lie in (0, 1); "
                        f"got density={d}, epsilon={e}"
                    )

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """Sparsify each (layer, model) tensor on its own, then combine layer by layer."""
        base, xs = leaf.base, leaf.inputs
        deltas = jnp.stack(
            [xs[:, i] if vec else xs[:, i] - base for i, vec in enumerate(leaf.is_vector)], axis=1
        )
        if self.sparsifier is not None:
            deltas = self._sparsify_layers(leaf, deltas, flags["rescale"])
        weights = jnp.asarray(leaf.values.model("weight"), F32)  # (N, L)
        lam = jnp.asarray(leaf.values.shared_array("lambda"), F32)  # (L,)

        def one_layer(b, d, w, lam_l):
            return combine(
                b, d, w, consensus=self.consensus, normalize=flags["normalize"], lam=lam_l
            )

        return jax.vmap(one_layer, in_axes=(0, 0, 1, 0))(base, deltas, weights, lam)

    def _sparsify_layers(self, leaf: Leaf, deltas: jax.Array, rescale: bool) -> jax.Array:
        """(L, N, *s) -> (L, N, *s), every (layer, model) tensor sparsified on its own, as
        mergekit sparsifies each Hugging Face tensor."""
        n_layers, n = deltas.shape[:2]
        flat = deltas.reshape(n_layers * n, *deltas.shape[2:])  # layer-major, like the noise
        rows = {  # (N, L) values -> one per row of `flat`
            name: leaf.values.model(name).T.reshape(-1)
            for name in ("density", "gamma", "epsilon")
            if self.spec(name) is not None
        }
        norm = "l1" if rescale else False  # mergekit 0.1.5: rescale -> RescaleNorm.l1
        # On the HF tensor: della ranks within its rows (torch dim 1), and equal
        # magnitudes are taken in its flat order (as the host executor takes them).
        hf = to_hf(flat, leaf.layout, lead=1)
        u = None if leaf.noise is None else to_hf(leaf.noise, leaf.layout, lead=1)
        out = sparsify(self.sparsifier, hf, rows, norm, uniform=u)
        return from_hf(out, leaf.layout, flat.shape, 1).reshape(deltas.shape)


def _method(name, consensus, sparsifier, normalize, rescale, in_mergekit=True) -> TaskArithmetic:
    """A family member with mergekit 0.1.5's parameters and defaults."""
    params = [
        weight(),
        ParamSpec("density", float, True, 1.0, 0.0, 1.0),
        ParamSpec("normalize", bool, False, normalize),
        ParamSpec("rescale", bool, False, rescale),
        ParamSpec("lambda", float, False, 1.0),
        ParamSpec("int8_mask", bool, False, False),  # memory only in mergekit: no effect
    ]
    if sparsifier == "breadcrumbs":
        params.append(ParamSpec("gamma", float, True, 0.01, 0.0, 1.0))
    if sparsifier == "della":
        params.append(ParamSpec("epsilon", float, True, 0.15, 0.0, 1.0))
    return TaskArithmetic(
        name=name,
        params=tuple(params),
        sparsifier=sparsifier,
        consensus=consensus,
        random=sparsifier in ("random", "della"),
        in_mergekit=in_mergekit,
    )


#       name                consensus  sparsifier     normalize rescale
METHODS = (
    _method("task_arithmetic", None, None, False, False),
    _method("dem", None, None, False, False, in_mergekit=False),
    _method("ties", "sum", "magnitude", True, False),
    _method("dare_ties", "sum", "random", False, True),
    _method("dare_linear", None, "random", False, True),
    _method("breadcrumbs", None, "breadcrumbs", False, False),
    _method("breadcrumbs_ties", "sum", "breadcrumbs", False, False),
    _method("della", "sum", "della", True, True),
    _method("della_linear", None, "della", False, True),
)
