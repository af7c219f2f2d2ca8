"""The search objective, from m_d = each distribution's token-weighted mean NLL on its
own held-out split (= its log-perplexity):

* ``mean_log_ppl`` (default, the paper's): mean_d m_d;
* ``weighted_log_ppl``: Σ_d w_d m_d / Σ_d w_d with ``objective_weights``;
* ``max_log_ppl``: max_d m_d, the worst distribution (gradient: that one's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dem_jax.config.run import SearchConfig
from dem_jax.errors import DemError

OBJECTIVES = ("mean_log_ppl", "weighted_log_ppl", "max_log_ppl")


def objective_value(
    mean_nll: np.ndarray, objective: str = "mean_log_ppl", weights: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """(objective, d objective / d mean_nll) from per-distribution mean NLLs."""
    m = np.asarray(mean_nll, np.float64)
    if objective == "mean_log_ppl":
        return float(m.mean()), np.full_like(m, 1.0 / len(m))
    if objective == "weighted_log_ppl":
        w = np.asarray(weights, np.float64) / np.sum(weights)
        return float(w @ m), w
    if objective == "max_log_ppl":
        worst = int(np.argmax(m))
        return float(m[worst]), np.eye(len(m))[worst]
    raise DemError(f"search.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")


def objective_weights(cfg: SearchConfig, names: Sequence[str]) -> list[float] | None:
    """``search.objective_weights`` in distribution order (every name needs one)."""
    if cfg.objective != "weighted_log_ppl":
        return None
    weights = cfg.objective_weights or {}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DemError(f"search.objective_weights: unknown distribution {unknown[0]!r}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise DemError(f"search.objective_weights: no weight for distribution {missing[0]!r}")
    return [float(weights[n]) for n in names]
