"""Fisher merging: the merge formula by hand, and the diagonal Fisher of a tiny model
against per-example jax.grad in a Python loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import TINY_MODEL

import dem_jax
from dem_jax.data.batches import pad_batches
from dem_jax.data.packing import make_rows
from dem_jax.data.tokenize import Encoding
from dem_jax.errors import DemError
from dem_jax.merge.methods import fisher
from dem_jax.model.transformer import apply

CONFIG = TINY_MODEL

# --------------------------------------------------------------- the merge


def tree(a, b):
    return {"w": jnp.asarray(a, jnp.float32), "sub": {"b": jnp.asarray(b, jnp.float32)}}


def test_equal_fishers_give_the_average():
    rng = np.random.default_rng(0)
    params = [tree(rng.normal(size=(3, 5)), rng.normal(size=7)) for _ in range(3)]
    f = tree(rng.uniform(0.1, 2.0, (3, 5)), rng.uniform(0.1, 2.0, 7))
    merged = fisher.fisher_merge(params, [f, f, f])
    for key in ("w", "b"):
        leaves = [p["w"] if key == "w" else p["sub"]["b"] for p in params]
        got = merged["w"] if key == "w" else merged["sub"]["b"]
        np.testing.assert_allclose(got, np.mean(leaves, axis=0), rtol=1e-6, atol=1e-7)


def test_fisher_weighted_hand_values():
    # Element 0: F = (1, 3), θ = (0, 4) -> (1·0 + 3·4) / 4 = 3.
    # Element 1: F = (0, 0) -> both floored to eps -> plain mean (2 + 6) / 2 = 4.
    # Element 2: F = (2, 0), θ = (1, 9) -> (2·1 + 1e-6·9) / (2 + 1e-6).
    # With weights (1, 3), element 0: (0 + 3·3·4) / (1 + 9) = 3.6.
    p1, p2 = tree([0.0, 2.0, 1.0], [0.0]), tree([4.0, 6.0, 9.0], [1.0])
    f1, f2 = tree([1.0, 0.0, 2.0], [1.0]), tree([3.0, 0.0, 0.0], [1.0])
    merged = fisher.fisher_merge([p1, p2], [f1, f2])
    np.testing.assert_allclose(merged["w"], [3.0, 4.0, (2 + 1e-6 * 9) / (2 + 1e-6)], rtol=1e-6)
    weighted = fisher.fisher_merge([p1, p2], [f1, f2], weights=[1.0, 3.0])
    assert float(weighted["w"][0]) == pytest.approx(3.6, rel=1e-6)
    with pytest.raises(DemError):
        fisher.fisher_merge([p1, p2], [f1, f2], eps=0.0)


# ------------------------------------------------- the Fisher of a tiny model


def rows_for(seed, n_docs=6, seq_len=11):
    """Unpacked rows (one document each): some with a prompt (no loss) prefix."""
    rng = np.random.default_rng(seed)
    encodings = []
    for _ in range(n_docs):
        n = int(rng.integers(3, seq_len + 1))
        mask = np.ones(n, bool)
        mask[: int(rng.integers(1, n - 1))] = False
        encodings.append(Encoding(rng.integers(0, CONFIG.vocab_size, n).astype(np.int32), mask))
    return make_rows(encodings, seq_len, packing=False)


def hand_fisher(params, rows):
    """(1/N) Σ_n (∇ log p(row n))², one jax.grad per row in a Python loop."""

    def loglik(p, row):
        logits = apply(
            p, CONFIG, row["tokens"][None], row["positions"][None], row["segment_ids"][None]
        )[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = jnp.take_along_axis(logp, row["targets"][:, None], axis=-1)[:, 0]
        return jnp.sum(target * row["loss_mask"])

    grad = jax.jit(jax.grad(loglik))
    total, n = None, 0
    for row in rows:
        if row["loss_mask"].sum() == 0:
            continue
        sq = jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, grad(params, row))
        total = sq if total is None else jax.tree.map(np.add, total, sq)
        n += 1
    return jax.tree.map(lambda t: t / n, total)


@pytest.fixture(scope="module")
def tiny():
    params = dem_jax.init_model(CONFIG, seed=3).params
    rows = rows_for(0)
    return params, rows, hand_fisher(params, rows)


def test_diagonal_fisher_matches_per_example_loop(tiny):
    params, rows, expected = tiny
    # Batches of 4: the last is filled with blank rows, which must not count. Two rows
    # per step: each step's vmap and the scan over steps both matter.
    batches = pad_batches(rows, 4)
    assert len(batches) == 2 and batches[-1]["loss_mask"][-1].sum() == 0
    got = fisher.diagonal_fisher(params, CONFIG, batches, rows_per_step=2)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    flat_got = jax.tree.leaves(got)
    flat_exp = jax.tree.leaves(expected)
    for g, e in zip(flat_got, flat_exp, strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-12 + 1e-4 * float(np.max(e)))
    assert float(np.max(flat_got[0])) > 0  # not trivially zero


def test_diagonal_fisher_rejects_empty_and_bad_chunking(tiny):
    params, rows, _ = tiny
    blank = pad_batches(rows, 4)[-1]
    blank = {k: v[-1:].repeat(4, 0) for k, v in blank.items()}  # four rows, no loss tokens
    with pytest.raises(DemError):
        fisher.diagonal_fisher(params, CONFIG, [blank], rows_per_step=2)
    with pytest.raises(DemError):
        fisher.diagonal_fisher(params, CONFIG, pad_batches(rows, 4), rows_per_step=3)
