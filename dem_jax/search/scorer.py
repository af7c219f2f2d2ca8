"""Scoring candidate merge weights ω by validation NLL, all in device memory.

A :class:`MergeScorer` holds the base Θ, the distribution vectors ΔΘ_i and every
validation batch on the device mesh once; scoring a candidate ω is one call of a
jitted function that builds the merge (:func:`dem_jax.search.edit.edit_params`) on
device and runs a ``lax.scan`` over all validation batches. ω is a traced
argument, so candidates never recompile and no checkpoint is written per candidate.

The merge is linear in ω, so the gradient of a batch's NLL with respect to ω is
the vector-Jacobian product of the merge applied to the gradient with respect to
the merged parameters: one backward pass gives every ∂NLL/∂ω_i.

Cost is counted in forward-equivalents over the whole validation set: a
candidate costs 1, a gradient step 3 (a backward pass counted as 2 forwards). The
merge itself (k multiply-adds per parameter) is left out: it is small next to a
forward pass over B*T tokens per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dem_jax.config.model import ModelConfig
from dem_jax.data.batches import EncodedSet, pad_batches
from dem_jax.data.tokenize import check_ids_fit
from dem_jax.errors import DemError
from dem_jax.model.losses import batch_nll
from dem_jax.search.edit import edit_params, layer_leaves
from dem_jax.search.objective import objective_value
from dem_jax.search.score import Score
from dem_jax.sharding.placement import check_batch_size, place_params
from dem_jax.sharding.rules import BATCH_AXES, param_shardings

FORWARDS_PER_EVAL = 1.0
FORWARDS_PER_GRADIENT = 3.0  # forward + backward, the backward counted as 2 forwards


def _make_scan_fn(config: ModelConfig, num_sets: int, with_grad: bool):
    """A jittable (omega, base, vectors, batches, set_ids) -> per-set sums [and Jacobian]."""
    stacked = layer_leaves(config)

    def fn(omega, base, vectors, batches, set_ids):
        def merge(w):
            return edit_params(base, vectors, w, stacked)

        if with_grad:
            params, merge_vjp = jax.vjp(merge, omega)
        else:
            params = merge(omega)

        def body(carry, xs):
            batch, set_id = xs
            onehot = jax.nn.one_hot(set_id, num_sets, dtype=jnp.float32)  # (S,)
            if with_grad:
                (nll, count), g_params = jax.value_and_grad(
                    lambda p: batch_nll(p, config, batch), has_aux=True
                )(params)
                (g_omega,) = merge_vjp(g_params)  # d nll / d omega, omega's shape
                jac = onehot.reshape(-1, *([1] * omega.ndim)) * g_omega.astype(jnp.float32)
                carry = {**carry, "jac": carry["jac"] + jac}
            else:
                nll, count = batch_nll(params, config, batch)
            return {
                **carry,
                "nll": carry["nll"] + onehot * nll,
                "count": carry["count"] + onehot * count,
            }, None

        init = {"nll": jnp.zeros(num_sets), "count": jnp.zeros(num_sets)}
        if with_grad:
            init["jac"] = jnp.zeros((num_sets, *omega.shape))
        out, _ = jax.lax.scan(body, init, (batches, set_ids))
        return out

    return jax.jit(fn)


@dataclass
class Candidate:
    """One evaluated ω."""

    omega: np.ndarray  # (k,) or (k, L + 1)
    nll_sum: np.ndarray  # (S,) summed NLL per validation set
    tokens: np.ndarray  # (S,) loss tokens per validation set
    objective: float
    grad: np.ndarray | None = None  # d objective / d omega (gradient strategy)
    forward_equivalents: float = 0.0  # cumulative cost of the search up to this candidate

    @property
    def mean_nll(self) -> np.ndarray:
        """Per-set log-perplexity."""
        return self.nll_sum / self.tokens


class MergeScorer:
    """Scores Θ + Σ ω_i ΔΘ_i on validation sets for any ω, without recompiling.

    ``vectors`` are parameter pytrees shaped like ``base``; ``sets`` maps a
    validation set's name to its rows (:func:`dem_jax.data.batches.encode_records`).
    Everything is placed once: parameters on their shardings, the batches
    stacked to (N, B, T) with B split over the mesh's data-parallel axes.
    """

    def __init__(
        self,
        config: ModelConfig,
        base: Any,
        vectors: Sequence[Any],
        sets: Mapping[str, EncodedSet],
        batch_size: int,
        mesh: Mesh | None = None,
        max_batches: int = 0,
        objective: str = "mean_log_ppl",
        objective_weights: Sequence[float] | None = None,
    ):
        if not vectors:
            raise DemError("search: no distribution vectors to merge")
        check_batch_size(batch_size, mesh, "search.batch_size")
        self.config, self.mesh = config, mesh
        self.num_vectors, self.set_names = len(vectors), list(sets)
        self.objective, self.weights = objective, objective_weights
        self.base = place_params(base, config, mesh)
        self.vectors = [place_params(v, config, mesh) for v in vectors]
        self.batches, self.set_ids = self._place_batches(sets, batch_size, max_batches)
        self.bytes = np.array([s.bytes if max_batches == 0 else 0 for s in sets.values()], np.int64)
        self.forward_equivalents = 0.0
        self._eval = _make_scan_fn(config, len(sets), with_grad=False)
        self._grad = _make_scan_fn(config, len(sets), with_grad=True)
        self._merge = jax.jit(
            lambda base, vectors, omega: edit_params(base, vectors, omega, layer_leaves(config)),
            out_shardings=None if mesh is None else param_shardings(config, mesh),
        )

    def _place_batches(self, sets, batch_size, max_batches):
        batches, ids = [], []
        for i, (name, encoded) in enumerate(sets.items()):
            mine = pad_batches(encoded.rows, batch_size, max_batches)
            if not mine or encoded.tokens == 0:
                raise DemError(f"search: validation set {name!r} has no loss tokens")
            batches += mine
            ids += [i] * len(mine)
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}  # (N, B, T)
        check_ids_fit([stacked["tokens"], stacked["targets"]], self.config.vocab_size, "search")
        if self.mesh is None:
            return jax.device_put(stacked), jax.device_put(np.asarray(ids, np.int32))
        sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES, None))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return (
            jax.device_put(stacked, sharding),
            jax.device_put(np.asarray(ids, np.int32), replicated),
        )

    def omega_shape(self, per_layer: bool = False) -> tuple[int, ...]:
        """(k,), or (k, L + 1) with one ω per layer and one for non-layer parameters."""
        k = self.num_vectors
        return (k, self.config.num_layers + 1) if per_layer else (k,)

    def _check(self, omega) -> jax.Array:
        omega = jnp.asarray(omega, jnp.float32)
        if omega.shape not in (self.omega_shape(False), self.omega_shape(True)):
            raise DemError(
                f"search: omega has shape {omega.shape}, expected {self.omega_shape(False)} "
                f"or {self.omega_shape(True)}"
            )
        return omega

    def evaluate(self, omega, with_grad: bool = False) -> Candidate:
        """Scores of one ω (and d objective / d ω with ``with_grad``)."""
        omega = self._check(omega)
        fn = self._grad if with_grad else self._eval
        out = jax.device_get(fn(omega, self.base, self.vectors, self.batches, self.set_ids))
        nll, count = np.asarray(out["nll"], np.float64), np.asarray(out["count"], np.float64)
        value, d_mean = objective_value(nll / count, self.objective, self.weights)
        grad = None
        if with_grad:
            # objective(m), m_s = nll_s / count_s, counts independent of omega.
            grad = np.tensordot(d_mean / count, np.asarray(out["jac"], np.float64), axes=1)
        self.forward_equivalents += FORWARDS_PER_GRADIENT if with_grad else FORWARDS_PER_EVAL
        return Candidate(
            np.asarray(omega, np.float64), nll, count, value, grad, self.forward_equivalents
        )

    def merged_params(self, omega) -> Any:
        """The merged parameters for ``omega``, on the parameters' shardings."""
        return self._merge(self.base, self.vectors, self._check(omega))

    def scores(self, candidate: Candidate) -> dict[str, Score]:
        """Per-set :class:`~dem_jax.search.score.Score` of a candidate."""
        return {
            name: Score(float(candidate.nll_sum[i]), int(candidate.tokens[i]), int(self.bytes[i]))
            for i, name in enumerate(self.set_names)
        }
