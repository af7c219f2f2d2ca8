"""Search strategies over merge weights ω (``SearchConfig.strategy``):

* ``grid``: the paper's search, the Cartesian product of per-distribution
  value lists;
* ``random``: Dirichlet(concentration) samples scaled to sum to ``scale``;
* ``gradient``: Adam on ω, from the scorer's exact ∂objective/∂ω. With
  ``per_layer`` each distribution gets one ω per layer for the stacked layer
  parameters plus one for the rest (embeddings, final norm, output head): ω has
  shape (k, L + 1).

Every candidate tried is kept in the :class:`SearchResult`, in order.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dem_jax.config.run import SearchConfig
from dem_jax.errors import DemError
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


def grid_omegas(cfg: SearchConfig, names: Sequence[str]) -> np.ndarray:
    """The Cartesian product of per-distribution value lists, (n, k)."""
    if isinstance(cfg.grid, dict):
        unknown = sorted(set(cfg.grid) - set(names))
        if unknown:
            raise DemError(
                f"search.grid: unknown distribution {unknown[0]!r} (searching: {', '.join(names)})"
            )
        missing = [n for n in names if n not in cfg.grid]
        if missing:
            raise DemError(f"search.grid: no values for distribution {missing[0]!r}")
        lists = [cfg.grid[n] for n in names]
    else:
        lists = [cfg.grid] * len(names)
    return np.array(list(itertools.product(*lists)), np.float64).reshape(-1, len(names))


def dirichlet_omegas(cfg: SearchConfig, k: int) -> np.ndarray:
    """``samples`` Dirichlet(concentration) draws scaled to sum to ``scale``, (n, k)."""
    rng = np.random.default_rng(cfg.seed)
    return cfg.scale * rng.dirichlet(np.full(k, cfg.concentration), size=cfg.samples)


def _describe(c: Candidate) -> str:
    omega = np.round(c.omega if c.omega.ndim == 1 else c.omega.mean(axis=1), 3).tolist()
    return f"omega={omega} objective={c.objective:.5f}"


def _gradient_search(scorer: MergeScorer, cfg: SearchConfig, result: SearchResult, log) -> None:
    """Adam on ω for ``cfg.steps`` steps, every step's candidate appended to ``result``."""
    tx = optax.adam(cfg.learning_rate)

    @jax.jit  # eager optax costs tens of ms of dispatch per step on a host CPU
    def adam_step(omega, state, grad):
        updates, state = tx.update(grad, state, omega)
        return optax.apply_updates(omega, updates), state

    omega = jnp.full(scorer.omega_shape(cfg.per_layer), cfg.init, jnp.float32)
    state = tx.init(omega)
    for step in range(cfg.steps):
        cand = scorer.evaluate(omega, with_grad=True)
        result.candidates.append(cand)
        log(f"search step {step + 1}/{cfg.steps}: {_describe(cand)}")
        omega, state = adam_step(omega, state, jnp.asarray(cand.grad, jnp.float32))


def run_search(
    scorer: MergeScorer, cfg: SearchConfig, names: Sequence[str], progress: Progress | None = None
) -> SearchResult:
    """Run ``cfg.strategy`` on ``scorer``; every candidate is kept in the result."""
    result = SearchResult(list(names), cfg.strategy, cfg.objective)
    log = progress or (lambda _: None)
    start = time.perf_counter()
    if cfg.strategy == "gradient":
        _gradient_search(scorer, cfg, result, log)
    else:
        if cfg.strategy == "grid":
            omegas = grid_omegas(cfg, names)
        else:
            omegas = dirichlet_omegas(cfg, len(names))
        for i, omega in enumerate(omegas):
            cand = scorer.evaluate(omega)
            result.candidates.append(cand)
            log(f"search candidate {i + 1}/{len(omegas)}: {_describe(cand)}")
    log(
        f"search: best {_describe(result.best)} after {len(result.candidates)} candidates, "
        f"{scorer.forward_equivalents:g} forward-equivalents, {time.perf_counter() - start:.1f}s"
    )
    return result
