"""TaskPGM: mixture proportions from the behavioural similarity of fine-tuned models.

Chanda et al., *Learning What Matters: Probabilistic Task Selection via Mutual
Information for Model Finetuning* (arXiv:2507.12612, 2025; later titled
*Learning Task Mixtures from Task Affinities*). Each distribution is a node of a
Markov random field; a similarity matrix S between the distributions' fine-tuned
models gives unary potentials (representativeness, ``S 1``) and pairwise
potentials (redundancy, ``S``); the proportions p minimise the energy

    E(p) = ½ λ pᵀ S̃ p − β (S 1)ᵀ p    over the simplex  {p ≥ 0, 1ᵀp = 1}

with S̃ the symmetrised S shifted to be positive definite (:func:`psd_shift`).

Two similarity measures, both computed from each fine-tuned model's predictions
on the distributions' validation *loss tokens* (rows as in
:mod:`dem_jax.data.packing`):

* :func:`similarity_pmi` — a symmetrised log-likelihood ratio (what the paper
  calls PMI; the definition follows the authors' released code,
  ``src/metrics/pmi.py``, per token instead of per sequence).
* :func:`similarity_jsd` — 1 − JSD/ln 2 of the models' next-token distributions.

Everything that touches parameters or data is a jitted pass over batches; the
quadratic programme is N×N (N distributions) and solved on the host in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax.errors import DemError
from dem_jax.model.losses import batch_nll
from dem_jax.model.transformer import apply

# One (B, T) batch of rows: tokens, targets, loss_mask, segment_ids, positions.
Batch = Mapping[str, Any]

# --------------------------------------------------------------------------- PMI

_batch_nll = jax.jit(batch_nll, static_argnums=1)


def loglik_matrix(
    params_list: Sequence[Any], config, batches: Sequence[Sequence[Batch]]
) -> np.ndarray:
    """L (M, N): mean log-likelihood per loss token of model m on distribution n.

        L[m, n] = (1 / |T_n|) Σ_{t ∈ T_n} log p_{θ_m}(y_t | y_<t)

    where T_n are the loss tokens of ``batches[n]`` (a list of (B, T) batches).
    Token-weighted, as :mod:`dem_jax.search.score` (L[m, n] = −mean NLL).
    """
    out = np.zeros((len(params_list), len(batches)))
    for n, dist_batches in enumerate(batches):
        for m, params in enumerate(params_list):
            # Dispatch every batch before fetching, then sum in float64 on the host.
            parts = jax.device_get([_batch_nll(params, config, b) for b in dist_batches])
            nll = sum(float(s) for s, _ in parts)
            count = sum(float(c) for _, c in parts)
            if count == 0:
                raise DemError(f"distribution {n}: no loss tokens to score")
            out[m, n] = -nll / count
    return out


def pmi_matrix(loglik: np.ndarray) -> np.ndarray:
    """Symmetrised log-likelihood ratio between square (N, N) ``loglik`` models.

        PMI_ij = ½ [ (L[j, i] − L[i, i]) + (L[i, j] − L[j, j]) ]

    the mean over distribution i's loss tokens of log p_j(y|x) / p_i(y|x), and
    the same with i and j swapped, averaged. Model i is the one fine-tuned on
    distribution i. PMI_ii = 0; two models that predict identically have
    PMI = 0 (zero divergence); the more each model is specialised away from the
    other's distribution, the more negative PMI_ij (it can be > 0 when model j
    fits distribution i better than model i does). Units: nats per token.
    """
    loglik = np.asarray(loglik, np.float64)
    if loglik.ndim != 2 or loglik.shape[0] != loglik.shape[1]:
        raise DemError(f"loglik must be square (models × distributions), got {loglik.shape}")
    own = np.diag(loglik)
    # ratio[i, j] = mean over D_i of log p_j − log p_i = L[j, i] − L[i, i]
    ratio = loglik.T - own[:, None]
    return 0.5 * (ratio + ratio.T)


def similarity_pmi(
    params_list: Sequence[Any], config, batches: Sequence[Sequence[Batch]]
) -> np.ndarray:
    """TaskPGM's PMI similarity (N, N) of N fine-tuned models on their N validation sets.

    ``params_list[i]`` is the model fine-tuned on distribution i and
    ``batches[i]`` that distribution's validation batches. Returns
    :func:`pmi_matrix` of :func:`loglik_matrix`: symmetric, zero diagonal,
    S_ij = ½ [mean_{D_i} log p_j/p_i + mean_{D_j} log p_i/p_j] (nats per token).
    The authors' code sums log-probabilities over each completion and averages
    over examples; per-token means keep distributions with long and short
    completions on one scale. Cost: N² forward passes over the validation sets.
    """
    if len(params_list) != len(batches):
        raise DemError(f"{len(params_list)} models for {len(batches)} distributions")
    return pmi_matrix(loglik_matrix(params_list, config, batches))


# --------------------------------------------------------------------------- JSD


def jensen_shannon(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """JSD(p, q) in nats over the last axis, from log-probabilities.

        JSD = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = ½ (p + q)

    Symmetric, 0 iff p = q, at most ln 2. Zero-probability entries (−inf logs)
    contribute nothing, as 0 log 0 = 0.
    """
    logp = logp.astype(jnp.float32)
    logq = logq.astype(jnp.float32)
    logm = jnp.logaddexp(logp, logq) - math.log(2.0)

    def kl_to_m(loga):
        a = jnp.exp(loga)
        # where a == 0 the term is 0 even though loga − logm is −inf (0·−inf = nan).
        return jnp.sum(jnp.where(a > 0, a * (loga - logm), 0.0), axis=-1)

    return 0.5 * kl_to_m(logp) + 0.5 * kl_to_m(logq)


@functools.partial(jax.jit, static_argnums=2)
def _pair_jsd_sum(params_a, params_b, config, batch):
    """(Σ over loss tokens of JSD(p_a, p_b) at that position, number of loss tokens)."""

    def log_probs(params):
        logits = apply(params, config, batch["tokens"], batch["positions"], batch["segment_ids"])
        return jax.nn.log_softmax(logits, axis=-1)  # (B, T, V)

    jsd = jensen_shannon(log_probs(params_a), log_probs(params_b))  # (B, T)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(jsd * mask), jnp.sum(mask)


def mean_jsd(params_a, params_b, config, batches: Sequence[Batch]) -> float:
    """Token-weighted mean JSD (nats) between two models' next-token distributions
    over the loss tokens of ``batches``."""
    parts = jax.device_get([_pair_jsd_sum(params_a, params_b, config, b) for b in batches])
    total = sum(float(s) for s, _ in parts)
    count = sum(float(c) for _, c in parts)
    if count == 0:
        raise DemError("no loss tokens to compare the models on")
    return total / count


def similarity_jsd(
    params_list: Sequence[Any], config, batches: Sequence[Sequence[Batch]]
) -> np.ndarray:
    """TaskPGM's JSD similarity (N, N): S_ij = 1 − JSD_ij / ln 2, in [0, 1].

        JSD_ij = ½ [ mean_{t ∈ D_i} JSD(p_i(·|t), p_j(·|t)) + mean_{t ∈ D_j} (same) ]

    the next-token distributions of models i and j compared at every loss token
    of both validation sets, each set weighted equally. Symmetric; S_ii = 1;
    identical models give S_ij = 1 (maximal similarity); models that put their
    mass on disjoint tokens everywhere give 0. Cost: 2 forward passes per batch
    per pair, N(N−1)/2 pairs, memory of two models' (B, T, V) logits.
    """
    n = len(params_list)
    if n != len(batches):
        raise DemError(f"{n} models for {len(batches)} distributions")
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            jsd = 0.5 * (
                mean_jsd(params_list[i], params_list[j], config, batches[i])
                + mean_jsd(params_list[i], params_list[j], config, batches[j])
            )
            sim[i, j] = sim[j, i] = 1.0 - jsd / math.log(2.0)
    return sim


# ------------------------------------------------------------------ optimisation


def psd_shift(S, eps: float = 1e-6) -> np.ndarray:
    """S̃ = ½(S + Sᵀ) + (max(−λ_min, 0) + eps) I: symmetric and positive definite.

    λ_min is the smallest eigenvalue of the symmetrised S; eps > 0 makes S̃
    strictly positive definite (smallest eigenvalue ≥ eps), so the energy is
    strictly convex and its minimiser unique.
    """
    S = np.asarray(S, np.float64)
    sym = 0.5 * (S + S.T)
    lam_min = float(np.linalg.eigvalsh(sym).min())
    return sym + (max(-lam_min, 0.0) + eps) * np.eye(len(sym))


def project_simplex(v) -> np.ndarray:
    """Euclidean projection of v onto the probability simplex {p ≥ 0, Σ p = 1}.

    argmin_p ‖p − v‖² is p = max(v − τ, 0), τ chosen so Σ p = 1: with u = v
    sorted decreasing, ρ = max{k : u_k − (Σ_{i≤k} u_i − 1)/k > 0} and
    τ = (Σ_{i≤ρ} u_i − 1)/ρ (Held et al. 1974; Duchi et al. 2008).
    """
    v = np.asarray(v, np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = int(np.nonzero(u - css / k > 0)[0][-1]) + 1  # k = 1 always qualifies
    tau = css[rho - 1] / rho
    return np.maximum(v - tau, 0.0)


def _equality_qp(Q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin ½ yᵀQy + cᵀy subject to 1ᵀy = 1, from the KKT system

        [Q  1] [y]   [−c]
        [1ᵀ 0] [ν] = [ 1]

    (ν the multiplier). Solved as one linear system rather than through Q⁻¹:
    it only needs Q positive definite on the hyperplane 1ᵀy = 0.
    """
    k = len(c)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = Q
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    return np.linalg.solve(kkt, np.concatenate([-c, [1.0]]))[:k]


def _simplex_qp_active_set(Q: np.ndarray, c: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Exact argmin ½ pᵀQp + cᵀp on the simplex, Q positive definite.

    Primal active-set method (Nocedal & Wright, Algorithm 16.3): the working
    set W holds indices fixed at p_i = 0; each step solves the equality QP on
    the free indices; a step that would make a free p_i negative stops at the
    boundary and adds i to W; at a stationary point the multipliers
    μ_i = (Qp + c)_i − ν (ν the common gradient on the free set) of W are
    checked and the most negative one leaves W. A strictly convex QP reaches
    the optimum in finitely many steps, at which the KKT conditions hold
    exactly (up to rounding).
    """
    n = len(c)
    p = np.full(n, 1.0 / n)  # feasible start, no bound active
    fixed = np.zeros(n, bool)
    scale = max(1.0, float(np.abs(Q).max()), float(np.abs(c).max()))
    for _ in range(50 * n + 50):
        free = ~fixed
        y = np.zeros(n)
        y[free] = _equality_qp(Q[np.ix_(free, free)], c[free])
        d = y - p
        if np.abs(d).max() <= 1e-10:
            grad = Q @ y + c
            nu = grad[free].mean()  # on the free set ∇ = ν 1 exactly
            mu = np.where(fixed, grad - nu, np.inf)
            i = int(np.argmin(mu))
            if mu[i] >= -tol * scale:
                return y
            fixed[i] = False
            p = y
            continue
        blocking = free & (d < 0)
        steps = np.where(blocking, -p / np.where(blocking, d, -1.0), np.inf)
        j = int(np.argmin(steps))
        alpha = min(1.0, steps[j])
        p = p + alpha * d
        if alpha < 1.0:
            fixed[j] = True
            p[j] = 0.0
    raise DemError("TaskPGM: active-set solver did not converge")


def taskpgm_proportions(
    S, lam: float = 1.0, beta: float = 1.0, method: str = "exact", eps: float = 1e-6
) -> np.ndarray:
    """Mixture proportions p (N,) minimising the TaskPGM energy on the simplex.

        min_p  ½ λ pᵀ S̃ p − β (S_sym 1)ᵀ p   s.t.  p ≥ 0,  1ᵀp = 1

    S_sym = ½(S + Sᵀ), S̃ = :func:`psd_shift` (S_sym, eps). (The authors' code
    uses S̃ 1 in the linear term; S̃ 1 − S_sym 1 is a constant vector, and a
    constant times 1ᵀp = 1 on the simplex, so both give the same minimiser.)

    ``method``:

    * ``"exact"`` (default): the constrained optimum, by an active-set solver
      (:func:`_simplex_qp_active_set`); unique since S̃ is positive definite.
    * ``"closed_form"``: the paper's closed form. With Q = λ S̃ and
      c = −β S_sym 1, the equality-constrained minimiser is
      p_eq = Q⁻¹(ν1 − c), ν = (1 + 1ᵀQ⁻¹c) / 1ᵀQ⁻¹1, followed by
      :func:`project_simplex`.

    Is closed form + projection the constrained optimum? Only in special cases:
    when p_eq ≥ 0 already (then the projection is the identity and p_eq solves
    the constrained problem too), or when Q acts as a multiple of the identity on
    the hyperplane 1ᵀp = 0 (then the energy's level sets are spheres there and
    the Euclidean projection is the Q-metric projection). In general the
    Euclidean projection of p_eq is not the minimiser: the optimum is the
    projection in the metric Q, not in the Euclidean one (the tests give a
    3-distribution counterexample). Hence ``"exact"`` is the default.
    """
    if lam <= 0:
        raise DemError(f"TaskPGM: lam must be > 0, got {lam}")
    S = np.asarray(S, np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or not np.all(np.isfinite(S)):
        raise DemError(f"TaskPGM: S must be a finite square matrix, got shape {S.shape}")
    sym = 0.5 * (S + S.T)
    Q = lam * psd_shift(sym, eps)
    c = -beta * sym.sum(axis=1)
    if method == "exact":
        p = _simplex_qp_active_set(Q, c)
    elif method == "closed_form":
        p = project_simplex(_equality_qp(Q, c))
    else:
        raise DemError(f"TaskPGM: method must be 'exact' or 'closed_form', got {method!r}")
    # Clean rounding: exact zeros stay zero and the sum is exactly one.
    p = np.maximum(p, 0.0)
    return p / p.sum()


def taskpgm_energy(p, S, lam: float = 1.0, beta: float = 1.0, eps: float = 1e-6) -> float:
    """E(p) = ½ λ pᵀ S̃ p − β (S_sym 1)ᵀ p, the objective :func:`taskpgm_proportions` minimises."""
    p = np.asarray(p, np.float64)
    S = np.asarray(S, np.float64)
    sym = 0.5 * (S + S.T)
    return float(0.5 * lam * p @ psd_shift(sym, eps) @ p - beta * sym.sum(axis=1) @ p)
