"""The bayes (Optuna TPE) strategy on a known objective, strategy-name checking, and
the search's progress output. A fake scorer stands in for MergeScorer: each
candidate's objective is a quadratic bowl with a known minimum, so no model is run."""

import numpy as np
import pytest

from dem_jax.config.loader import load_run_config
from dem_jax.config.run import STRATEGIES, SearchConfig
from dem_jax.errors import DemError
from dem_jax.search.scorer import Candidate
from dem_jax.search.strategies import grid_bounds, grid_omegas, run_search

NAMES = ("a", "b", "c")
TARGET = np.array([0.3, 0.7, 0.55])  # the bowl's minimum, inside the [0, 1] box


class BowlScorer:
    """MergeScorer's interface: per-set log-ppl 1 + (ω_i − target_i)² (per layer: the
    mean over layers), objective their mean; every ω seen is kept in ``seen``."""

    def __init__(self, target=TARGET, layers=2):
        self.target, self.layers = np.asarray(target, np.float64), layers
        self.forward_equivalents, self.seen = 0.0, []

    def omega_shape(self, per_layer=False):
        k = len(self.target)
        return (k, self.layers + 1) if per_layer else (k,)

    def evaluate(self, omega, with_grad=False):
        omega = np.asarray(omega, np.float64)
        assert omega.shape in (self.omega_shape(False), self.omega_shape(True))
        self.seen.append(omega.copy())
        target = self.target if omega.ndim == 1 else self.target[:, None]
        m = 1.0 + (omega - target) ** 2
        m = m if m.ndim == 1 else m.mean(axis=1)
        self.forward_equivalents += 1.0
        tokens = np.full(len(m), 100.0)
        return Candidate(omega, m * tokens, tokens, float(m.mean()), None, self.forward_equivalents)


def bayes(samples=40, seed=0, **kw):
    return SearchConfig(strategy="bayes", samples=samples, seed=seed, **kw)


def test_bayes_finds_the_minimum_and_records_every_trial():
    scorer = BowlScorer()
    result = run_search(scorer, bayes(samples=40), NAMES)
    assert result.strategy == "bayes" and len(result.candidates) == 40
    assert scorer.forward_equivalents == 40  # one evaluation per trial, nothing else
    # Every trial is in the result, in order, as the scorer saw it.
    for cand, seen in zip(result.candidates, scorer.seen, strict=True):
        np.testing.assert_array_equal(cand.omega, seen)
    assert [c.forward_equivalents for c in result.candidates] == list(range(1, 41))
    # Within 2e-3 of the true minimum (1.0): far better than the [0, 0.5, 1] grid
    # over the same box, whose best is 1 + (0.2² + 0.2² + 0.05²) / 3 ≈ 1.0275.
    grid = run_search(BowlScorer(), SearchConfig(strategy="grid"), NAMES)
    assert grid.best.objective == pytest.approx(1 + (0.04 + 0.04 + 0.0025) / 3)
    assert result.best.objective < 1.002 < grid.best.objective
    np.testing.assert_allclose(result.best.omega, TARGET, atol=0.1)


def test_bayes_is_reproducible_with_its_seed():
    omegas = [
        [c.omega for c in run_search(BowlScorer(), bayes(15, seed), NAMES).candidates]
        for seed in (7, 7, 8)
    ]
    np.testing.assert_array_equal(omegas[0], omegas[1])
    assert not np.allclose(omegas[0], omegas[2])


def test_bayes_respects_each_distributions_bounds():
    # a: [0.2, 0.8]; b: [-1, 2] (its list's extremes, unsorted); c: one value, held fixed.
    grid = {"a": [0.2, 0.8], "b": [2.0, -1.0, 0.5], "c": [0.4]}
    cfg = bayes(25, grid=grid)
    low, high = grid_bounds(cfg, NAMES)
    assert low.tolist() == [0.2, -1.0, 0.4] and high.tolist() == [0.8, 2.0, 0.4]
    omegas = np.array([c.omega for c in run_search(BowlScorer(), cfg, NAMES).candidates])
    assert ((omegas >= low) & (omegas <= high)).all()
    assert (omegas[:, 2] == 0.4).all() and np.ptp(omegas[:, 1]) > 1.0  # b explores its range
    with pytest.raises(DemError, match=r"search\.grid: unknown distribution 'd'"):
        grid_bounds(bayes(grid={**grid, "d": [1.0]}), NAMES)


def test_bayes_per_layer_searches_one_omega_per_layer():
    scorer = BowlScorer(layers=2)
    result = run_search(scorer, bayes(20, grid=[-0.5, 1.5], per_layer=True), NAMES)
    omegas = np.array([c.omega for c in result.candidates])
    assert omegas.shape == (20, 3, 3)
    assert omegas.min() >= -0.5 and omegas.max() <= 1.5
    assert len(np.unique(omegas[:, 0, :].round(6))) > 20  # layers vary independently


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("gird", "grid"), ("bayesian", "bayes"), ("randm", "random"), ("gradients", "gradient")],
)
def test_unknown_strategy_suggests_the_closest(name, suggestion):
    with pytest.raises(DemError, match=f"did you mean '{suggestion}'") as err:
        SearchConfig(strategy=name)
    assert str(err.value).startswith(f"search.strategy: unknown strategy '{name}'")
    assert all(s in str(err.value) for s in STRATEGIES)


def test_unknown_strategy_without_a_close_name_lists_the_known(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nmodel: {init: {vocab_size: 13}}\n")
    with pytest.raises(DemError, match=r"search\.strategy") as err:
        load_run_config(path, ["search.strategy=xyzzy"])
    assert "did you mean" not in str(err.value) and "grid, random, bayes, gradient" in str(
        err.value
    )
    cfg = SearchConfig()
    cfg.strategy = "gird"  # changed after validation: run_search checks it again
    with pytest.raises(DemError, match="did you mean 'grid'"):
        run_search(BowlScorer(), cfg, NAMES)


def test_progress_is_one_bar_and_one_summary_line(capsys, monkeypatch):
    monkeypatch.delenv("DEM_JAX_QUIET", raising=False)
    lines = []
    run_search(BowlScorer(), SearchConfig(strategy="grid"), NAMES, progress=lines.append)
    err = capsys.readouterr().err
    assert len(lines) == 1 and lines[0].startswith("search: best omega=")
    assert "27 candidates (grid)" in lines[0]
    assert "search grid" in err and "27/27" in err  # tqdm's bar, on stderr
    run_search(BowlScorer(), bayes(5), NAMES)  # no progress callback: silent
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_grid_order_is_unchanged():
    # grid_omegas now shares its value lists with grid_bounds: same product, same order.
    omegas = grid_omegas(SearchConfig(grid={"a": [0, 1], "b": [2], "c": [3, 4]}), NAMES)
    assert omegas.tolist() == [[0, 2, 3], [0, 2, 4], [1, 2, 3], [1, 2, 4]]
