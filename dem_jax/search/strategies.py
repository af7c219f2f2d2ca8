"""Search strategies over merge weights ω (``SearchConfig.strategy``):

* ``grid``: the paper's search, the Cartesian product of per-distribution
  value lists;
* ``random``: Dirichlet(concentration) samples scaled to sum to ``scale``;
* ``bayes``: ``samples`` trials of Optuna's TPE sampler (seeded by ``seed``) over
  the box the grid spans, each ω_i in [min, max] of its value list; with
  ``per_layer``, one ω per layer as for ``gradient``;
* ``gradient``: Adam on ω, from the scorer's exact ∂objective/∂ω. With
  ``per_layer`` each distribution gets one ω per layer for the stacked layer
  parameters plus one for the rest (embeddings, final norm, output head): ω has
  shape (k, L + 1).

Every candidate tried is kept in the :class:`SearchResult`, in order. Progress is
one tqdm bar on stderr (over candidates, or over gradient steps) and a final
summary line; both are off when no ``progress`` callback is given.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dem_jax.config.run import SearchConfig, check_strategy
from dem_jax.errors import DemError
from dem_jax.io.progress_bar import progress_bar
from dem_jax.search.score import Progress
from dem_jax.search.scorer import Candidate, MergeScorer


@dataclass
class SearchResult:
    """Every candidate tried, in order, and the chosen one."""

    names: list[str]  # distributions, in ω order (= validation set order)
    strategy: str
    objective: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def best_index(self) -> int:
        """Index of the candidate with the lowest objective (the first on ties)."""
        return int(np.argmin([c.objective for c in self.candidates]))

    @property
    def best(self) -> Candidate:
        """The chosen candidate."""
        return self.candidates[self.best_index]


def _grid_lists(cfg: SearchConfig, names: Sequence[str]) -> list[list[float]]:
    """Each distribution's value list, in ``names`` order."""
    if not isinstance(cfg.grid, dict):
        return [list(cfg.grid)] * len(names)
    unknown = sorted(set(cfg.grid) - set(names))
    if unknown:
        raise DemError(
            f"search.grid: unknown distribution {unknown[0]!r} (searching: {', '.join(names)})"
        )
    missing = [n for n in names if n not in cfg.grid]
    if missing:
        raise DemError(f"search.grid: no values for distribution {missing[0]!r}")
    return [list(cfg.grid[n]) for n in names]


def grid_omegas(cfg: SearchConfig, names: Sequence[str]) -> np.ndarray:
    """The Cartesian product of per-distribution value lists, (n, k)."""
    lists = _grid_lists(cfg, names)
    return np.array(list(itertools.product(*lists)), np.float64).reshape(-1, len(names))


def grid_bounds(cfg: SearchConfig, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (k,): the box the grid spans, [min, max] of each value list."""
    lists = _grid_lists(cfg, names)
    return np.array([min(v) for v in lists], np.float64), np.array(
        [max(v) for v in lists], np.float64
    )


def dirichlet_omegas(cfg: SearchConfig, k: int) -> np.ndarray:
    """``samples`` Dirichlet(concentration) draws scaled to sum to ``scale``, (n, k)."""
    rng = np.random.default_rng(cfg.seed)
    return cfg.scale * rng.dirichlet(np.full(k, cfg.concentration), size=cfg.samples)


def _describe(c: Candidate) -> str:
    omega = np.round(c.omega if c.omega.ndim == 1 else c.omega.mean(axis=1), 3).tolist()
    return f"omega={omega} objective={c.objective:.5f}"


def _gradient_search(scorer: MergeScorer, cfg: SearchConfig, result: SearchResult, bar) -> None:
    """Adam on ω for ``cfg.steps`` steps, every step's candidate appended to ``result``."""
    tx = optax.adam(cfg.learning_rate)

    @jax.jit  # eager optax costs tens of ms of dispatch per step on a host CPU
    def adam_step(omega, state, grad):
        updates, state = tx.update(grad, state, omega)
        return optax.apply_updates(omega, updates), state

    omega = jnp.full(scorer.omega_shape(cfg.per_layer), cfg.init, jnp.float32)
    state = tx.init(omega)
    for _ in range(cfg.steps):
        cand = scorer.evaluate(omega, with_grad=True)
        _record(result, cand, bar)
        omega, state = adam_step(omega, state, jnp.asarray(cand.grad, jnp.float32))


def _bayes_search(
    scorer: MergeScorer, cfg: SearchConfig, names: Sequence[str], result: SearchResult, bar
) -> None:
    """``cfg.samples`` TPE trials over the grid's box, each one scorer evaluation."""
    # Imported here: optuna (and SQLAlchemy under it) is only needed by this strategy.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shape = scorer.omega_shape(cfg.per_layer)  # (k,) or (k, L + 1)
    low, high = grid_bounds(cfg, names)
    low = np.broadcast_to(low.reshape(-1, *[1] * (len(shape) - 1)), shape)
    high = np.broadcast_to(high.reshape(-1, *[1] * (len(shape) - 1)), shape)
    with warnings.catch_warnings():  # multivariate TPE is "experimental" in optuna 4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for _ in range(cfg.samples):
        trial = study.ask()
        omega = np.empty(shape, np.float64)
        for index in np.ndindex(*shape):
            lo, hi = float(low[index]), float(high[index])
            key = "omega_" + "_".join([names[index[0]], *map(str, index[1:])])
            omega[index] = lo if lo == hi else trial.suggest_float(key, lo, hi)
        cand = scorer.evaluate(omega)
        if math.isfinite(cand.objective):
            study.tell(trial, cand.objective)
        else:  # a diverged merge: TPE learns nothing from it, the table still shows it
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _record(result, cand, bar)


def _record(result: SearchResult, cand: Candidate, bar) -> None:
    result.candidates.append(cand)
    bar.update(1)
    bar.set_postfix_str(f"best {result.best.objective:.5f}", refresh=False)


def run_search(
    scorer: MergeScorer, cfg: SearchConfig, names: Sequence[str], progress: Progress | None = None
) -> SearchResult:
    """Run ``cfg.strategy`` on ``scorer``; every candidate is kept in the result.

    With ``progress``, a tqdm bar on stderr follows the candidates (steps for
    ``gradient``) and one summary line goes to ``progress`` at the end."""
    check_strategy(cfg.strategy)
    result = SearchResult(list(names), cfg.strategy, cfg.objective)
    start = time.perf_counter()
    omegas, total = None, cfg.steps if cfg.strategy == "gradient" else cfg.samples
    if cfg.strategy == "grid":
        omegas = grid_omegas(cfg, names)
    elif cfg.strategy == "random":
        omegas = dirichlet_omegas(cfg, len(names))
    if omegas is not None:
        total = len(omegas)
    unit = "step" if cfg.strategy == "gradient" else "cand"
    bar = progress_bar(total, f"search {cfg.strategy}", unit=unit, enabled=progress is not None)
    with bar:
        if cfg.strategy == "gradient":
            _gradient_search(scorer, cfg, result, bar)
        elif cfg.strategy == "bayes":
            _bayes_search(scorer, cfg, names, result, bar)
        else:
            for omega in omegas:
                _record(result, scorer.evaluate(omega), bar)
    if progress is not None:
        progress(
            f"search: best {_describe(result.best)} after {len(result.candidates)} candidates "
            f"({cfg.strategy}), {scorer.forward_equivalents:g} forward-equivalents, "
            f"{time.perf_counter() - start:.1f}s"
        )
    return result
