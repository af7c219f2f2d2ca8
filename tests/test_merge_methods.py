"""Merge-method math against hand computations written out from the definitions.

Expected values are either literal numbers worked out by hand in the comments, or
plain-NumPy / plain-Python reference computations that follow the published
definitions step by step (they share no code with ``dem_jax.merge``). Named methods
(``ties``, ``della``...) are the registry's objects applied to one tensor with their
declared defaults.
"""

from __future__ import annotations

import functools
import inspect
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax.merge import sparsify
from dem_jax.merge.methods import linear, model_stock, parameter_selection, slerp, task_arithmetic
from dem_jax.merge.registry import METHODS


def _named(name: str, third: str | None = None):
    """Registry method ``name`` on one tensor: (base, deltas, weights[, density[, third]])."""
    method = METHODS[name]

    def fn(base, deltas, weights, density=None, extra=None, *, key=None, lam=None, **settings):
        density = settings.pop("densities", density)
        extra = settings.pop(f"{third}s", extra) if third else extra
        if density is not None:
            settings["density"] = density
        if extra is not None:
            settings[third] = extra
        if lam is not None:
            settings["lambda"] = lam
        return method.merge_tensor(base, deltas, weights, key=key, **settings)

    return fn


def _gta(
    base,
    deltas,
    weights,
    *,
    sparsify=None,
    consensus=None,
    densities=None,
    gammas=None,
    epsilons=None,
    key=None,
    normalize=False,
    rescale=True,
    lam=1.0,
):
    """The generic task-vector engine: sparsify, then sign consensus and weighted sum."""
    d = jnp.asarray(deltas, jnp.float32)
    if sparsify is not None:
        values = {"density": densities, "gamma": gammas, "epsilon": epsilons}
        d = task_arithmetic.sparsify(sparsify, d, values, rescale, key)
    return task_arithmetic.combine(
        base, d, weights, consensus=consensus, normalize=normalize, lam=lam
    )


_NAMED = {
    name: _named(name, {"breadcrumbs": "gamma", "della": "epsilon"}.get(m.sparsifier))
    for name, m in METHODS.items()
    if isinstance(m, task_arithmetic.TaskArithmetic) and name != "dem"
}
_MODULES = (sparsify, linear, model_stock, parameter_selection, slerp, task_arithmetic)
# Every public tensor-level function of the merge math, and the named methods.
_PUBLIC = {
    n: f
    for mod in _MODULES
    for n, f in vars(mod).items()
    if inspect.isfunction(f) and f.__module__ == mod.__name__ and not n.startswith("_")
}
mm = SimpleNamespace(**_PUBLIC, **_NAMED, generalized_task_arithmetic=_gta)
mm.__all__ = sorted(
    set(_PUBLIC) - {"sparsify", "combine"} | set(_NAMED) | {"generalized_task_arithmetic"}
)

# Ten distinct magnitudes; ascending |x| order (index: value):
#   7: 0.02, 3: -0.05, 0: 0.1, 5: -0.2, 2: 0.3, 8: -0.4, 1: -0.5, 9: 0.6, 6: 0.7, 4: 0.9
D10 = np.array([0.1, -0.5, 0.3, -0.05, 0.9, -0.2, 0.7, 0.02, -0.4, 0.6], np.float32)


def close(actual, expected, atol=1e-6, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


# ----------------------------------------------------------------- TIES trim


def test_magnitude_keeps_top_density_fraction():
    # k = int(0.3 * 10) = 3 -> keep 0.9, 0.7, 0.6 (indices 4, 6, 9).
    out = mm.sparsify_magnitude(D10[None], 0.3)
    expected = [0, 0, 0, 0, 0.9, 0, 0.7, 0, 0, 0.6]
    close(out[0], expected)
    assert out.dtype == jnp.float32


def test_magnitude_per_model_density_and_identity():
    # model 0: k = int(0.5 * 4) = 2 -> |-0.8|, |0.5|; model 1: density 1 -> unchanged.
    deltas = np.array([[0.5, -0.1, 0.3, -0.8], [0.2, -0.6, 0.4, 0.1]], np.float32)
    out = mm.sparsify_magnitude(deltas, np.array([0.5, 1.0]))
    close(out, [[0.5, 0, 0, -0.8], [0.2, -0.6, 0.4, 0.1]])


def test_magnitude_ties_broken_by_index():
    # All |x| equal, k = 2: the stable order keeps the two earliest elements.
    out = mm.sparsify_magnitude(np.array([[1.0, -1.0, 1.0, -1.0]]), 0.5)
    close(out, [[1.0, -1.0, 0.0, 0.0]])


def test_magnitude_count_rounding_like_mergekit():
    # mergekit: k = int(density * numel) in float64; int(0.29 * 100) == 28.
    assert int(0.29 * 100) == 28
    x = np.arange(1, 101, dtype=np.float32)[None]
    kept = int(np.count_nonzero(mm.sparsify_magnitude(x, 0.29)))
    assert kept == 28
    # Documented difference: a traced float32 density gives float32 rounding (29).
    traced = jax.jit(mm.sparsify_magnitude)(x, jnp.float32(0.29))
    assert int(np.count_nonzero(traced)) == 29
    # Closing over the density keeps mergekit's count under jit.
    closed = jax.jit(lambda t: mm.sparsify_magnitude(t, 0.29))(x)
    assert int(np.count_nonzero(closed)) == 28


@pytest.mark.parametrize("k", [0, 1, 9, 40, 77])
def test_selection_matches_a_stable_sort(k):
    # Many equal magnitudes (0..4): the radix select must pick ties in index order,
    # like a stable sort (descending for the largest, ascending for the smallest).
    x = np.random.default_rng(k).integers(0, 5, (3, 7, 11)).astype(np.float32)
    flat = x.reshape(3, -1)
    for fn, keys in ((sparsify._largest, -flat), (sparsify._smallest, flat)):
        ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
        want = (ranks < k).reshape(x.shape)
        np.testing.assert_array_equal(np.asarray(fn(x, np.full(3, k))), want)


def test_magnitude_positive_density_keeps_at_least_one():
    # mergekit 0.1.5: k = max(1, int(density * numel)); density <= 0 keeps nothing.
    x = np.array([[0.1, -0.5, 0.3]], np.float32)  # int(0.2 * 3) == 0 -> k = 1
    close(mm.sparsify_magnitude(x, 0.2), [[0.0, -0.5, 0.0]])
    close(mm.sparsify_magnitude(x, 0.0), [[0.0, 0.0, 0.0]])


def test_magnitude_rescale_true_keeps_l1_norm():
    # rescale_sum: kept 0.9 + 0.7 + 0.6 = 2.2; original L1 = 3.77; scale 3.77 / 2.2.
    out = mm.sparsify_magnitude(D10[None], 0.3, rescale=True)
    scale = 3.77 / 2.2
    close(out[0], np.array([0, 0, 0, 0, 0.9, 0, 0.7, 0, 0, 0.6]) * scale, atol=1e-5)


# ----------------------------------------------------------------- DARE


def test_dare_kept_values_are_delta_over_density():
    x = np.linspace(-2.0, 2.0, 4001, dtype=np.float32)
    x[x == 0] = 0.5
    out = np.asarray(mm.sparsify_random(x[None], 0.25, jax.random.key(0)))[0]
    kept = out != 0
    assert 0.2 < kept.mean() < 0.3  # about density of the entries survive
    close(out[kept], x[kept] / 0.25)  # exactly delta / density
    assert np.all(out[~kept] == 0)


def test_dare_no_rescale_keeps_raw_values():
    x = np.full((1, 1000), 0.7, np.float32)
    out = np.asarray(mm.sparsify_random(x, 0.4, jax.random.key(3), rescale=False))
    assert set(np.unique(out).tolist()) == {0.0, np.float32(0.7)}


def test_dare_expected_value_is_delta():
    delta = np.array([[0.5, -1.0, 2.0]], np.float32)
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = jax.vmap(lambda k: mm.sparsify_random(delta, 0.4, k))(keys)
    # std of one draw is |x| * sqrt(0.6 / 0.4); over 20000 draws <= 0.0122 * |x|.
    close(np.mean(np.asarray(draws), axis=0), delta, atol=0.08)


def test_dare_density_one_is_identity_and_l1_mode():
    x = D10[None]
    close(mm.sparsify_random(x, 1.0, jax.random.key(0)), x)
    out = mm.sparsify_random(x, 0.5, jax.random.key(0), rescale="l1")
    close(np.abs(np.asarray(out)).sum(), np.abs(D10).sum(), atol=1e-5)


# ----------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_keeps_middle_band():
    # n = 10, density 0.5, gamma 0.1: target 5, n_top 1, n_bot 4.
    # Drop 4 smallest (0.02, 0.05, 0.1, 0.2) and the largest (0.9): keep 0.3 .. 0.7.
    out = mm.sparsify_breadcrumbs(D10[None], 0.5, 0.1)
    close(out[0], [0, -0.5, 0.3, 0, 0, 0, 0.7, 0, -0.4, 0.6])


def test_breadcrumbs_negative_bottom_count_shrinks_top():
    # density 0.9, gamma 0.2: target 9, n_top 2, n_bot -1 -> n_top 1, n_bot 0.
    out = mm.sparsify_breadcrumbs(D10[None], 0.9, 0.2)
    expected = D10.copy()
    expected[4] = 0.0  # only the single largest (0.9) goes
    close(out[0], expected)


def test_breadcrumbs_zero_top_count_and_identity():
    # gamma 0.01 on 10 elements: n_top = 0, n_bot = 5 -> keep the 5 largest.
    out = mm.sparsify_breadcrumbs(D10[None], 0.5, 0.01)
    close(out[0], [0, -0.5, 0, 0, 0.9, 0, 0.7, 0, -0.4, 0.6])
    # density >= 1 returns the delta unchanged even with gamma > 0 (mergekit).
    close(mm.sparsify_breadcrumbs(D10[None], 1.0, 0.3), D10[None])


def _ref_breadcrumbs(x, density, gamma):
    """Model Breadcrumbs written out: sort |x| ascending, drop bottom and top."""
    n = x.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = sorted(range(n), key=lambda i: abs(float(x[i])))
    keep = set(order[n_bot : n - n_top])
    return np.array([x[i] if i in keep else 0.0 for i in range(n)], np.float32)


def test_breadcrumbs_method_defaults_gamma_001():
    # 100 elements, density 0.9, default gamma 0.01: target 90, n_top 1, n_bot 9.
    rng = np.random.default_rng(0)
    x = (rng.permutation(100) + 1).astype(np.float32) * rng.choice([-1, 1], 100)
    x = x / 100
    base = np.zeros(100, np.float32)
    out = mm.breadcrumbs(base, x[None], np.array([1.0]), densities=0.9)
    close(out, _ref_breadcrumbs(x, 0.9, 0.01))
    assert np.count_nonzero(out) == 90


# ----------------------------------------------------------------- DELLA


def test_della_keep_probabilities_by_rank():
    # |x| ranks 1..5 -> p = (0.5 - 0.2) + (r - 1) / 4 * 0.4 = 0.3, 0.4, 0.5, 0.6, 0.7.
    x = np.array([[0.1, -0.4, 0.2, 0.3, -0.5]], np.float32)
    probs = mm.della_keep_probabilities(x, 0.5, 0.2)
    close(probs, [[0.3, 0.6, 0.4, 0.5, 0.7]])


def test_della_probabilities_ranked_per_row_and_axis():
    # per-model shape (2, 3); rank along axis 1 (mergekit dim=1) or axis 0.
    x = np.array([[[1.0, 3.0, 2.0], [6.0, 4.0, 5.0]]], np.float32)
    close(mm.della_keep_probabilities(x, 0.5, 0.2), [[[0.3, 0.7, 0.5], [0.7, 0.3, 0.5]]])
    close(
        mm.della_keep_probabilities(x, 0.5, 0.2, rank_axis=0),
        [[[0.3, 0.3, 0.3], [0.7, 0.7, 0.7]]],
    )


def test_della_keep_frequency_and_rescale():
    row = np.array([0.1, -0.4, 0.2, 0.3, -0.5], np.float32)
    x = np.tile(row, (20000, 1))[None]  # (1, 20000, 5): 20000 identical rows
    out = np.asarray(mm.sparsify_della(x, 0.5, 0.2, jax.random.key(7)))[0]
    p = np.array([0.3, 0.6, 0.4, 0.5, 0.7])
    kept = out != 0
    close(kept.mean(axis=0), p, atol=0.02)  # binomial std <= 0.0036
    # each kept value is exactly x / p: 0.1/0.3, -0.4/0.6, 0.2/0.4, 0.3/0.5, -0.5/0.7
    expected_kept = np.array([1 / 3, -2 / 3, 0.5, 0.6, -5 / 7])
    for col in range(5):
        close(out[kept[:, col], col], expected_kept[col], atol=1e-6)
    close(out.mean(axis=0), row, atol=0.02)  # E[x m / p] = x


def test_della_no_rescale_identity_zero_and_validation():
    x = np.array([[0.1, -0.4, 0.2, 0.3, -0.5]], np.float32)
    out = np.asarray(mm.sparsify_della(x, 0.5, 0.2, jax.random.key(0), rescale=False))
    assert np.all((out == 0) | (out == x))
    close(mm.sparsify_della(x, 1.0, 0.2, jax.random.key(0)), x)
    close(mm.sparsify_della(x, 0.0, 0.2, jax.random.key(0)), np.zeros_like(x))
    with pytest.raises(ValueError, match="epsilon"):
        mm.sparsify_della(x, 0.1, 0.15, jax.random.key(0))


# ----------------------------------------------------------------- TIES elect / merge


def test_sign_consensus_sum_vs_count():
    # column 0: [3, -1, -1]  sum +1 -> keep +; count (+1 -1 -1) = -1 -> keep -.
    # column 1: [0, 2, -1]   sum +1 -> +; count 0 >= 0 -> +; the zero is never kept.
    deltas = np.array([[3.0, 0.0], [-1.0, 2.0], [-1.0, -1.0]], np.float32)
    close(mm.sign_consensus(deltas, np.ones(3), "sum"), [[1, 0], [0, 1], [0, 0]])
    close(mm.sign_consensus(deltas, np.ones(3), "count"), [[0, 0], [1, 1], [1, 0]])


def test_sign_consensus_uses_weighted_deltas():
    # deltas all +1, weights [1, 1, -5]: y = [1, 1, -5]; sum -3 -> -, count +1 -> +.
    deltas = np.ones((3, 1), np.float32)
    w = np.array([1.0, 1.0, -5.0])
    close(mm.sign_consensus(deltas, w, "sum"), [[0], [0], [1]])
    close(mm.sign_consensus(deltas, w, "count"), [[1], [1], [0]])


TIES_BASE = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
TIES_DELTAS = np.array(
    [[0.5, -0.1, 0.3, -0.8], [-0.2, 0.6, -0.4, 0.1], [0.3, 0.2, -0.9, 0.7]], np.float32
)
TIES_W = np.array([1.0, 0.5, 2.0], np.float32)
TIES_DENS = np.array([0.5, 0.5, 0.75])


def test_ties_by_hand():
    # trim: k = 2, 2, 3
    #   m0 -> [0.5, 0, 0, -0.8]   m1 -> [0, 0.6, -0.4, 0]   m2 -> [0.3, 0, -0.9, 0.7]
    # weight (1, 0.5, 2):
    #   y0 = [0.5, 0, 0, -0.8]    y1 = [0, 0.3, -0.2, 0]    y2 = [0.6, 0, -1.8, 1.4]
    # elect (sum): [1.1, 0.3, -2.0, 0.6] -> signs [+, +, -, +]
    # disjoint sum:   [0.5+0.6, 0.3, -0.2-1.8, 1.4] = [1.1, 0.3, -2.0, 1.4]
    # weight divisor: [1+2,     0.5, 0.5+2,    2  ] = [3.0, 0.5, 2.5, 2.0]
    # mean: [0.366667, 0.6, -0.8, 0.7]; + base [1, 2, 3, 4]
    expected = [1.0 + 1.1 / 3.0, 2.6, 2.2, 4.7]
    out = mm.ties(TIES_BASE, TIES_DELTAS, TIES_W, TIES_DENS)
    close(out, expected)
    generic = mm.generalized_task_arithmetic(
        TIES_BASE,
        TIES_DELTAS,
        TIES_W,
        sparsify="magnitude",
        consensus="sum",
        densities=TIES_DENS,
        normalize=True,
        rescale=False,
    )
    close(generic, expected)


def test_ties_zero_divisor_falls_back_to_base():
    # a column with no surviving entries: mask all false, divisor 0 -> 1, delta 0.
    deltas = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    out = mm.ties(np.array([5.0, 7.0]), deltas, np.array([1.0, 1.0]))
    close(out, [5.0 + 3.0 / 2.0, 7.0])


def test_gta_without_consensus_normalize_and_zero_weight_sum():
    base = np.zeros(2, np.float32)
    deltas = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    # weights (1, 3): sum = [10, 17], / 4 = [2.5, 4.25]
    close(mm.task_arithmetic(base, deltas, np.array([1.0, 3.0]), normalize=True), [2.5, 4.25])
    # weights (2, -2) sum to 0 -> divisor 1: [2 - 6, 4 - 10] = [-4, -6]
    close(mm.task_arithmetic(base, deltas, np.array([2.0, -2.0]), normalize=True), [-4.0, -6.0])


def test_task_arithmetic_identities():
    base = np.array([0.3, -1.7, 2.5], np.float32)
    deltas = np.array([[0.1, 0.2, -0.3], [1.0, -2.0, 4.0]], np.float32)
    out0 = mm.task_arithmetic(base, deltas, np.zeros(2))
    np.testing.assert_array_equal(np.asarray(out0), base)  # exactly the base
    out1 = mm.task_arithmetic(base, deltas, np.array([1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(out1), base + deltas[0])
    # lambda scales the merged delta: 1 + 0.5 * (2 * 0.1 + 1 * 1.0) = 1.6 in column 0
    out2 = mm.task_arithmetic(base, deltas, np.array([2.0, 1.0]), lam=0.5)
    close(out2, base + 0.5 * (2 * deltas[0] + deltas[1]))


def test_dare_ties_defaults_no_normalize():
    # density 1 -> nothing dropped; consensus on weighted deltas, no division.
    # y = [[0.5, -0.1, 0.3, -0.8], [-0.1, 0.3, -0.2, 0.05], [0.6, 0.4, -1.8, 1.4]]
    # sum signs: [+, +, -, +]; kept sums: [1.1, 0.7, -2.0, 1.45]
    out = mm.dare_ties(TIES_BASE, TIES_DELTAS, TIES_W, key=jax.random.key(0))
    close(out, TIES_BASE + np.array([1.1, 0.7, -2.0, 1.45]))


def test_dare_linear_density_one_is_task_arithmetic():
    out = mm.dare_linear(TIES_BASE, TIES_DELTAS, TIES_W, key=jax.random.key(0))
    close(out, mm.task_arithmetic(TIES_BASE, TIES_DELTAS, TIES_W))


def _ref_disjoint_mean(base, sparse, w, normalize):
    """TIES elect + disjoint merge written out element by element."""
    out = base.astype(np.float64).copy()
    for e in range(base.size):
        y = [float(w[i]) * float(sparse[i, e]) for i in range(len(w))]
        sign = 1.0 if sum(y) >= 0 else -1.0
        agree = [i for i in range(len(w)) if np.sign(y[i]) == sign]
        total = sum(y[i] for i in agree)
        div = sum(float(w[i]) for i in agree) or 1.0
        out[e] += total / div if normalize else total
    return out


def test_della_merge_matches_sparsify_then_disjoint_mean():
    key = jax.random.key(11)
    rng = np.random.default_rng(1)
    base = rng.normal(size=32).astype(np.float32)
    deltas = rng.normal(size=(3, 32)).astype(np.float32)
    w = np.array([0.7, 1.2, 0.4], np.float32)
    dens, eps = np.array([0.5, 0.6, 0.4]), np.array([0.2, 0.1, 0.3])
    sparse = np.asarray(mm.sparsify_della(deltas, dens, eps, key))
    out = mm.della(base, deltas, w, dens, eps, key=key)  # default normalize=True
    close(out, _ref_disjoint_mean(base, sparse, w, normalize=True), atol=1e-5)
    lin = mm.della_linear(base, deltas, w, dens, eps, key=key)  # no consensus, no norm
    close(lin, base + (w[:, None] * sparse).sum(axis=0), atol=1e-5)
    # density 1 (mergekit default): della == consensus-sum normalised task arithmetic
    close(
        mm.della(TIES_BASE, TIES_DELTAS, TIES_W, key=key),
        _ref_disjoint_mean(TIES_BASE, TIES_DELTAS, TIES_W, normalize=True),
    )


def test_breadcrumbs_ties_by_hand():
    # density 0.5, gamma 0.25 on 4 elements: target 2, n_top 1, n_bot 1 -> keep ranks 1, 2
    # m0 |.| asc: 0.1(1) 0.3(2) 0.5(0) 0.8(3) -> keep idx 2, 0 -> [0.5, 0, 0.3, 0]
    # m1 |.| asc: 0.1(3) 0.2(0) 0.4(2) 0.6(1) -> keep idx 0, 2 -> [-0.2, 0, -0.4, 0]
    # m2 |.| asc: 0.2(1) 0.3(0) 0.7(3) 0.9(2) -> keep idx 0, 3 -> [0.3, 0, 0, 0.7]
    # weights (1, 0.5, 2): y0 [0.5,0,0.3,0]  y1 [-0.1,0,-0.2,0]  y2 [0.6,0,0,1.4]
    # sums [1.0, 0, 0.1, 1.4] -> signs [+, +, +, +]; kept sums [1.1, 0, 0.3, 1.4]
    out = mm.breadcrumbs_ties(TIES_BASE, TIES_DELTAS, TIES_W, 0.5, 0.25)
    close(out, TIES_BASE + np.array([1.1, 0.0, 0.3, 1.4]))
    # breadcrumbs (no consensus): sums [1.0, 0, 0.1, 1.4]
    out = mm.breadcrumbs(TIES_BASE, TIES_DELTAS, TIES_W, 0.5, 0.25)
    close(out, TIES_BASE + np.array([1.0, 0.0, 0.1, 1.4]))


# ----------------------------------------------------------------- linear


def test_linear_normalize_on_off():
    models = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    w = np.array([1.0, 3.0])
    close(mm.linear(models, w, normalize=False), [10.0, 14.0])  # 1*[1,2] + 3*[3,4]
    close(mm.linear(models, w), [2.5, 3.5])  # / (1 + 3)


# ----------------------------------------------------------------- SLERP


def test_slerp_orthogonal_closed_form():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    close(mm.slerp(a, b, 0.0), a)
    close(mm.slerp(a, b, 1.0), b, atol=1e-7)
    h = math.sqrt(0.5)
    close(mm.slerp(a, b, 0.5), [h, h])  # sin(pi/4) / sin(pi/2) each
    close(mm.slerp(a, b, 0.25), [math.cos(math.pi / 8), math.sin(math.pi / 8)])
    # unnormalised inputs: coefficients apply to the original tensors
    close(mm.slerp(2 * a, 4 * b, 0.5), [2 * h, 4 * h])


def test_slerp_matrix_and_below_threshold():
    # angle with cos = 0.999 (< 0.9995) still uses slerp: theta = acos(0.999)
    theta = math.acos(0.999)
    a = np.array([[1.0, 0.0]], np.float32)
    b = np.array([[0.999, math.sin(theta)]], np.float32)
    t = 0.3
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    close(mm.slerp(a, b, t), s0 * a + s1 * b, atol=1e-5)


def test_slerp_near_parallel_falls_back_to_lerp():
    # exactly parallel (dot = 1) and antiparallel (dot = -1): slerp would divide by 0.
    a = np.array([1.0, 2.0])
    close(mm.slerp(a, 2 * a, 0.3), 0.7 * a + 0.3 * 2 * a)
    close(mm.slerp(np.array([1.0, 0.0]), np.array([-2.0, 0.0]), 0.5), [-0.5, 0.0])
    out = mm.slerp(np.array([1.0, 0.0]), np.array([1.0, 1e-3]), 0.4)  # dot ~ 0.9999995
    close(out, [1.0, 0.4e-3])
    assert np.all(np.isfinite(np.asarray(mm.slerp(a, a, 0.5))))


# ----------------------------------------------------------------- Model Stock


def test_model_stock_two_models_sixty_degrees():
    # offsets d1 = [1, 0], d2 = [cos 60, sin 60]: cos = 0.5, N = 2
    # t = 2 * 0.5 / (1 + 0.5) = 2/3; result = base + t * (d1 + d2) / 2
    #   = [1, 1] + (1/3) * [1.5, 0.866025] = [1.5, 1.288675]
    base = np.array([1.0, 1.0], np.float32)
    d1, d2 = np.array([1.0, 0.0]), np.array([0.5, math.sqrt(3) / 2])
    out = mm.model_stock(base, np.stack([base + d1, base + d2]))
    close(out, [1.5, 1.0 + math.sqrt(3) / 6], atol=1e-6)


def test_model_stock_orthogonal_and_three_models():
    base = np.zeros(3, np.float32)
    # orthogonal offsets: cos = 0 -> t = 0 -> the base
    close(mm.model_stock(base, np.array([[1.0, 0, 0], [0, 2.0, 0]])), base)
    # three offsets: cos12 = 0, cos13 = cos23 = 1/sqrt(2); mean c = sqrt(2)/3
    models = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]], np.float32)
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    close(mm.model_stock(base, models), t * models.mean(axis=0), atol=1e-6)


def test_model_stock_filter_wise_rows():
    # row 0 offsets at 60 degrees (t = 2/3), row 1 orthogonal (t = 0)
    base = np.zeros((2, 2), np.float32)
    m1 = np.array([[1.0, 0.0], [1.0, 0.0]])
    m2 = np.array([[0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    out = mm.model_stock(base, np.stack([m1, m2]), filter_wise=True)
    close(out, [[(2 / 3) * 0.75, (2 / 3) * math.sqrt(3) / 4], [0.0, 0.0]], atol=1e-6)


def test_model_stock_singular_keeps_the_base():
    # two opposite offsets: cos = -1, 1 + (N - 1) cos = 0 -> mergekit 0.1.5 uses t = 0
    base = np.array([1.0, 2.0], np.float32)
    offset = np.array([1.0, 0.0], np.float32)
    out = mm.model_stock(base, np.stack([base + offset, base - offset]))
    close(out, base)


# ----------------------------------------------------------------- parameter selection


def test_parameter_selection_picks_whole_elements_uniformly():
    n_models, size = 3, 30000
    # models[j, e] = j + 10 * e so the source model of every element is recoverable
    models = np.arange(n_models)[:, None] + 10.0 * np.arange(size)[None, :]
    out = np.asarray(mm.parameter_selection(models.astype(np.float32), jax.random.key(5)))
    src = out - 10.0 * np.arange(size)
    assert set(np.unique(src).tolist()) <= {0.0, 1.0, 2.0}
    freq = np.bincount(src.astype(int), minlength=3) / size
    close(freq, [1 / 3] * 3, atol=0.02)


def test_predrawn_uniforms_reproduce_the_key_draws():
    # uniform < p is exactly bernoulli(key, p) for uniform = jax.random.uniform(key, shape)
    key = jax.random.key(11)
    u = jax.random.uniform(key, TIES_DELTAS.shape)
    for rescale in (True, False, "l1"):
        a = mm.sparsify_random(TIES_DELTAS, 0.5, key, rescale)
        b = mm.sparsify_random(TIES_DELTAS, 0.5, None, rescale, uniform=u)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a = mm.sparsify_della(TIES_DELTAS, 0.5, 0.2, key)
    b = mm.sparsify_della(TIES_DELTAS, 0.5, 0.2, None, uniform=u)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # parameter selection from uniforms: model floor(N u)
    models = np.stack([np.zeros(4), np.ones(4), np.full(4, 2.0)]).astype(np.float32)
    u = np.array([0.0, 0.34, 0.67, 0.999], np.float32)
    close(mm.parameter_selection(models, None, uniform=u), [0.0, 1.0, 2.0, 2.0])


# ----------------------------------------------------------------- seeds, jit, dtype


RANDOM_FNS = {
    "sparsify_random": lambda k: mm.sparsify_random(TIES_DELTAS, 0.5, k),
    "sparsify_della": lambda k: mm.sparsify_della(TIES_DELTAS, 0.5, 0.2, k),
    "dare_linear": lambda k: mm.dare_linear(TIES_BASE, TIES_DELTAS, TIES_W, 0.5, key=k),
    "dare_ties": lambda k: mm.dare_ties(TIES_BASE, TIES_DELTAS, TIES_W, 0.5, key=k),
    "della": lambda k: mm.della(TIES_BASE, TIES_DELTAS, TIES_W, 0.5, 0.2, key=k),
    "della_linear": lambda k: mm.della_linear(TIES_BASE, TIES_DELTAS, TIES_W, 0.5, key=k),
    "parameter_selection": lambda k: mm.parameter_selection(TIES_DELTAS, k),
}


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
def test_seeded_reproducibility(name):
    fn = RANDOM_FNS[name]
    a = np.asarray(fn(jax.random.key(0)))
    np.testing.assert_array_equal(a, np.asarray(fn(jax.random.key(0))))
    # over several keys at least one result differs from key 0's
    others = [np.asarray(fn(jax.random.key(s))) for s in range(1, 6)]
    assert any(not np.array_equal(a, o) for o in others)


def _jit_cases():
    b, d, w = TIES_BASE, TIES_DELTAS, TIES_W
    dens = np.array([0.5, 0.5, 0.75], np.float32)
    eps = np.array([0.2, 0.1, 0.2], np.float32)
    gam = np.array([0.25, 0.25, 0.25], np.float32)
    k = jax.random.key(4)
    gta = functools.partial(
        mm.generalized_task_arithmetic, sparsify="magnitude", consensus="count", normalize=True
    )
    return {
        "sparsify_magnitude": (mm.sparsify_magnitude, (d, dens)),
        "sparsify_random": (mm.sparsify_random, (d, dens, k)),
        "sparsify_breadcrumbs": (mm.sparsify_breadcrumbs, (d, dens, gam)),
        "sparsify_della": (mm.sparsify_della, (d, dens, eps, k)),
        "della_keep_probabilities": (mm.della_keep_probabilities, (d, dens, eps)),
        "sign_consensus": (mm.sign_consensus, (d, w)),
        "generalized_task_arithmetic": (
            lambda b_, d_, w_, dn: gta(b_, d_, w_, densities=dn, lam=0.8),
            (b, d, w, dens),
        ),
        "task_arithmetic": (mm.task_arithmetic, (b, d, w)),
        "ties": (mm.ties, (b, d, w, dens)),
        "dare_linear": (lambda *a: mm.dare_linear(*a[:4], key=a[4]), (b, d, w, dens, k)),
        "dare_ties": (lambda *a: mm.dare_ties(*a[:4], key=a[4]), (b, d, w, dens, k)),
        "breadcrumbs": (mm.breadcrumbs, (b, d, w, dens, gam)),
        "breadcrumbs_ties": (mm.breadcrumbs_ties, (b, d, w, dens, gam)),
        "della": (lambda *a: mm.della(*a[:5], key=a[5]), (b, d, w, dens, eps, k)),
        "della_linear": (lambda *a: mm.della_linear(*a[:5], key=a[5]), (b, d, w, dens, eps, k)),
        "linear": (mm.linear, (d, w)),
        "slerp": (mm.slerp, (d[0], d[1], jnp.float32(0.3))),
        "model_stock": (mm.model_stock, (b, d)),
        "parameter_selection": (mm.parameter_selection, (d, k)),
        "top_k_mask": (lambda x, n: 1.0 * mm.top_k_mask(x, n), (abs(d), np.array([1, 2, 0]))),
    }


@pytest.mark.parametrize("name", sorted(_jit_cases()))
def test_runs_under_jit_and_matches_eager(name):
    fn, args = _jit_cases()[name]
    eager = np.asarray(fn(*args))
    jitted = np.asarray(jax.jit(fn)(*args))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


def test_all_public_functions_have_a_jit_case():
    assert set(mm.__all__) == set(_jit_cases())


def test_bf16_inputs_give_float32():
    base = jnp.asarray(TIES_BASE, jnp.bfloat16)
    deltas = jnp.asarray(TIES_DELTAS, jnp.bfloat16)
    assert mm.ties(base, deltas, TIES_W, TIES_DENS).dtype == jnp.float32
    assert mm.linear(deltas, TIES_W).dtype == jnp.float32
    assert mm.slerp(deltas[0], deltas[1], 0.5).dtype == jnp.float32


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="key"):
        mm.generalized_task_arithmetic(TIES_BASE, TIES_DELTAS, TIES_W, sparsify="random")
    with pytest.raises(ValueError, match="at least 2"):
        mm.model_stock(TIES_BASE, TIES_DELTAS[:1])
    with pytest.raises(ValueError, match="consensus"):
        mm.sign_consensus(TIES_DELTAS, TIES_W, "median")


def test_registry_is_every_method_module():
    # Adding a method is adding a module to dem_jax/merge/methods: the registry is
    # exactly the union of the modules' METHODS, each object declared once.
    import importlib
    import pkgutil

    from dem_jax.merge import methods as methods_pkg

    declared = []
    for info in pkgutil.iter_modules(methods_pkg.__path__):
        module = importlib.import_module(f"{methods_pkg.__name__}.{info.name}")
        assert module.METHODS, info.name
        declared.extend(module.METHODS)
    assert sorted(m.name for m in declared) == sorted(METHODS)
    assert all(METHODS[m.name] is m for m in declared)
    # Every parameter default is declared by the method object itself.
    assert METHODS["ties"].defaults({"weight": 1.0})["normalize"] is True
    assert METHODS["dare_linear"].defaults({"weight": 1.0})["rescale"] is True
    assert METHODS["breadcrumbs"].defaults({"weight": 1.0})["gamma"] == 0.01
