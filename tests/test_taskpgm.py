"""TaskPGM: the QP against scipy's SLSQP, the simplex projection, PMI and JSD similarity
against hand computations (literal numbers, and numpy on the model's logits)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy.optimize import minimize
from train_helpers import TINY_MODEL

import dem_jax
from dem_jax.data.batches import pad_batches
from dem_jax.data.packing import make_rows
from dem_jax.data.tokenize import Encoding
from dem_jax.mixture import taskpgm
from dem_jax.model.transformer import apply

# ------------------------------------------------------------------- the QP


def slsqp_energy_min(S, lam, beta, eps):
    """The same problem written out independently and handed to SLSQP."""
    S = np.asarray(S, np.float64)
    sym = (S + S.T) / 2
    shift = max(-np.linalg.eigvalsh(sym).min(), 0.0) + eps
    Q = lam * (sym + shift * np.eye(len(S)))
    c = -beta * sym @ np.ones(len(S))
    res = minimize(
        lambda p: 0.5 * p @ Q @ p + c @ p,
        np.full(len(S), 1 / len(S)),
        jac=lambda p: Q @ p + c,
        method="SLSQP",
        bounds=[(0, 1)] * len(S),
        constraints=[
            {"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones_like(p)}
        ],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x


# Hand-made similarity matrices: PMI-like (zero diagonal, negative, asymmetric),
# JSD-like (ones on the diagonal), indefinite, and one whose optimum is on a face.
CASES = [
    (
        [
            [0.0, -0.3, -1.2, -0.4],
            [-0.5, 0.0, -0.9, -0.2],
            [-1.0, -0.8, 0.0, -1.5],
            [-0.3, -0.1, -1.4, 0.0],
        ],
        1.0,
        1.0,
        0.05,
    ),
    ([[1.0, 0.8, 0.3], [0.8, 1.0, 0.6], [0.3, 0.6, 1.0]], 2.0, 0.5, 1e-3),
    (
        [
            [0.2, 1.5, -0.7, 0.1, 0.0],
            [1.5, -0.4, 0.3, 0.9, -1.1],
            [-0.7, 0.3, 1.0, 0.2, 0.4],
            [0.1, 0.9, 0.2, 0.5, -0.6],
            [0.0, -1.1, 0.4, -0.6, 0.3],
        ],
        1.0,
        1.0,
        0.1,
    ),
    ([[1.0, 0.5, -0.5], [0.5, 1.0, 0.5], [-0.5, 0.5, 2.0]], 1.0, 1.0, 1e-6),
]


@pytest.mark.parametrize("S, lam, beta, eps", CASES)
def test_exact_solution_matches_slsqp(S, lam, beta, eps):
    p = taskpgm.taskpgm_proportions(S, lam, beta, eps=eps)
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(p, slsqp_energy_min(S, lam, beta, eps), atol=1e-6)


def test_exact_solution_hand_case():
    # S = [[1, .5, -.5], [.5, 1, .5], [-.5, .5, 2]] (positive definite), S1 = (1, 2, 2).
    # On the face p1 = 0: ½(p2² + p2 p3 + 2 p3²) − 2 with p3 = 1 − p2 is minimal at
    # p2 = 3/4, E = −1.5625; the gradient there, Sp − S1 = (−.75, −1.125, −1.125),
    # gives p1 the multiplier −.75 + 1.125 = .375 ≥ 0, so this is the optimum.
    S = CASES[3][0]
    p = taskpgm.taskpgm_proportions(S, eps=1e-9)
    np.testing.assert_allclose(p, [0.0, 0.75, 0.25], atol=1e-8)
    assert taskpgm.taskpgm_energy(p, S, eps=1e-9) == pytest.approx(-1.5625, abs=1e-8)


def test_closed_form_then_projection_is_not_the_constrained_optimum():
    # The same S: the equality-constrained minimiser has a negative p1 and its
    # Euclidean projection is the vertex (0, 1, 0), with E = −1.5 > −1.5625.
    S = CASES[3][0]
    closed = taskpgm.taskpgm_proportions(S, method="closed_form", eps=1e-9)
    np.testing.assert_allclose(closed, [0.0, 1.0, 0.0], atol=1e-8)
    assert taskpgm.taskpgm_energy(closed, S, eps=1e-9) == pytest.approx(-1.5, abs=1e-8)


def test_closed_form_equals_exact_when_interior():
    # Zero-diagonal PMI-like S whose equality-constrained minimiser is > 0.
    S = [[0.0, -0.1, -0.2], [-0.1, 0.0, -2.0], [-0.2, -2.0, 0.0]]
    closed = taskpgm.taskpgm_proportions(S, method="closed_form")
    assert np.all(closed > 0.05)
    np.testing.assert_allclose(closed, taskpgm.taskpgm_proportions(S), atol=1e-12)
    np.testing.assert_allclose(closed, slsqp_energy_min(S, 1.0, 1.0, 1e-6), atol=1e-6)


def test_psd_shift():
    S = np.array([[0.0, 2.0], [1.0, 0.0]])  # symmetrised: eigenvalues ±1.5
    out = taskpgm.psd_shift(S, eps=0.25)
    np.testing.assert_allclose(out, [[1.75, 1.5], [1.5, 1.75]])
    assert np.linalg.eigvalsh(out).min() == pytest.approx(0.25)


@pytest.mark.parametrize(
    "v, expected",
    [
        ([0.6, 0.2], [0.7, 0.3]),  # τ = (0.8 − 1)/2 = −0.1
        ([2.0, 0.0], [1.0, 0.0]),  # τ = 1
        ([0.5, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]),
        # sorted (0.4, 0.2, 0.1, −3): three kept, τ = (0.7 − 1)/3 = −0.1
        ([0.2, -3.0, 0.4, 0.1], [0.3, 0.0, 0.5, 0.2]),
    ],
)
def test_project_simplex_hand_values(v, expected):
    np.testing.assert_allclose(taskpgm.project_simplex(v), expected, atol=1e-12)


def test_project_simplex_is_nearest_point():
    rng = np.random.default_rng(3)
    for _ in range(5):
        v = rng.normal(size=6) * 2
        p = taskpgm.project_simplex(v)
        ref = minimize(
            lambda x, v=v: np.sum((x - v) ** 2),
            np.full(6, 1 / 6),
            method="SLSQP",
            bounds=[(0, 1)] * 6,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 500},
        ).x
        np.testing.assert_allclose(p, ref, atol=1e-6)


# ------------------------------------------------------------ JSD, by hand


def test_jensen_shannon_hand_values():
    log = np.log
    # p = (½, ½), q = (1, 0): m = (¾, ¼); KL(p‖m) = ½ ln(4/3), KL(q‖m) = ln(4/3).
    p, q = log(np.array([0.5, 0.5])), np.array([0.0, -np.inf])
    expected = 0.75 * math.log(4 / 3)
    assert float(taskpgm.jensen_shannon(p, q)) == pytest.approx(expected, rel=1e-6)
    assert float(taskpgm.jensen_shannon(q, p)) == pytest.approx(expected, rel=1e-6)
    # Disjoint supports: ln 2; identical: 0.
    a, b = np.array([0.0, -np.inf]), np.array([-np.inf, 0.0])
    assert float(taskpgm.jensen_shannon(a, b)) == pytest.approx(math.log(2), rel=1e-6)
    r = log(np.array([0.2, 0.3, 0.5]))
    assert float(taskpgm.jensen_shannon(r, r)) == pytest.approx(0.0, abs=1e-7)


def test_pmi_matrix_hand_values():
    # L[m, n]: model m on distribution n (mean log-likelihood per token).
    L = np.array([[-1.0, -3.0], [-2.5, -1.5]])
    # PMI_01 = ½[(L10 − L00) + (L01 − L11)] = ½[(−2.5 + 1) + (−3 + 1.5)] = −1.5
    np.testing.assert_allclose(taskpgm.pmi_matrix(L), [[0.0, -1.5], [-1.5, 0.0]])


# ------------------------------------------------------ on a tiny model

CONFIG = TINY_MODEL


def batches_for(seed, n_docs=5, seq_len=13, batch_size=2):
    """Validation batches of random documents with prompt (no-loss) prefixes, padded rows."""
    rng = np.random.default_rng(seed)
    encodings = []
    for _ in range(n_docs):
        n = int(rng.integers(4, seq_len + 1))
        mask = np.ones(n, bool)
        mask[: int(rng.integers(1, n - 1))] = False
        encodings.append(Encoding(rng.integers(0, CONFIG.vocab_size, n).astype(np.int32), mask))
    return pad_batches(make_rows(encodings, seq_len, packing=True), batch_size)


def perturbed(params, seed, scale):
    """params + scale·N(0, 1) noise, drawn on the host (no per-shape compilations)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape), params)


@pytest.fixture(scope="module")
def models_and_data():
    # init_model's std 0.02 gives near-uniform predictions; noise makes them peaked,
    # and a second dose of noise makes a second, different model.
    a = perturbed(dem_jax.init_model(CONFIG, seed=1).params, 0, 0.3)
    b = perturbed(a, 1, 0.3)
    return a, b, [batches_for(0), batches_for(1)]


def numpy_log_probs(params, batch):
    logits = np.asarray(
        apply(params, CONFIG, batch["tokens"], batch["positions"], batch["segment_ids"]),
        np.float64,
    )
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def numpy_mean_jsd(a, b, batches):
    total = count = 0.0
    for batch in batches:
        p, q = np.exp(numpy_log_probs(a, batch)), np.exp(numpy_log_probs(b, batch))
        m = (p + q) / 2
        jsd = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
        total += (jsd * batch["loss_mask"]).sum()
        count += batch["loss_mask"].sum()
    return total / count


def numpy_mean_loglik(params, batches):
    total = count = 0.0
    for batch in batches:
        logp = numpy_log_probs(params, batch)
        target = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        total += (target * batch["loss_mask"]).sum()
        count += batch["loss_mask"].sum()
    return total / count


def test_identical_models_have_zero_divergence(models_and_data):
    a, _, data = models_and_data
    np.testing.assert_allclose(taskpgm.similarity_pmi([a, a], CONFIG, data), 0.0, atol=1e-6)
    np.testing.assert_allclose(taskpgm.similarity_jsd([a, a], CONFIG, data), 1.0, atol=1e-6)


def test_jsd_similarity_matches_numpy_and_is_symmetric(models_and_data):
    a, b, data = models_and_data
    ab = taskpgm.mean_jsd(a, b, CONFIG, data[0])
    assert ab == pytest.approx(taskpgm.mean_jsd(b, a, CONFIG, data[0]), rel=1e-5)
    assert ab == pytest.approx(numpy_mean_jsd(a, b, data[0]), rel=1e-4)
    sim = taskpgm.similarity_jsd([a, b], CONFIG, data)
    expected = 0.5 * (numpy_mean_jsd(a, b, data[0]) + numpy_mean_jsd(a, b, data[1]))
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
    assert 0 < sim[0, 1] < 1
    assert sim[0, 1] == pytest.approx(1 - expected / math.log(2), rel=1e-5)


def test_pmi_similarity_matches_numpy(models_and_data):
    a, b, data = models_and_data
    L = np.array([[numpy_mean_loglik(m, d) for d in data] for m in (a, b)])
    np.testing.assert_allclose(taskpgm.loglik_matrix([a, b], CONFIG, data), L, rtol=1e-5)
    S = taskpgm.similarity_pmi([a, b], CONFIG, data)
    expected = 0.5 * ((L[1, 0] - L[0, 0]) + (L[0, 1] - L[1, 1]))
    np.testing.assert_allclose(S, [[0.0, expected], [expected, 0.0]], rtol=1e-4, atol=1e-6)
    assert abs(expected) > 1e-3  # the perturbation is visible
