"""What DEM and data mixing cost, compared like with like.

DEM pays for one fine-tune per distribution and a weight search (forward passes
only). Data mixing pays for one full training run per mixture it tries; to choose
its proportions as DEM chooses ω it must search them too, one run per candidate
mixture. :func:`mixing_search_size` says how many runs a search at the resolution of
DEM's own search takes, and the assumption behind the number.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from dem_jax.model.flops import train_flops


def train_cost(config, steps: int, batch: int, seq_len: int, wall_s=None) -> dict[str, Any]:
    """Tokens and FLOPs of ``steps`` training steps (and their measured wall seconds)."""
    flops = train_flops(config, batch, seq_len, steps)
    return {
        "tokens": steps * batch * seq_len,
        "train_flops": flops,
        "total_flops": flops,
        "wall_s": wall_s,
    }


def _scalar_omegas(candidates: list[dict], names: list[str]) -> list[list[float]] | None:
    """Each candidate's ω as a list of floats, or None when ω is per layer."""
    out = []
    for c in candidates:
        omega = c["omega"]
        if any(not isinstance(omega[n], int | float) for n in names):
            return None
        out.append([float(omega[n]) for n in names])
    return out


def _grid_step(omegas: list[list[float]]) -> float | None:
    """The smallest gap between distinct ω values (the grid's step), or None."""
    values = sorted({round(w, 9) for omega in omegas for w in omega})
    gaps = [b - a for a, b in itertools.pairwise(values) if b - a > 1e-9]
    return min(gaps) if gaps else None


def mixing_search_size(table: dict[str, Any]) -> tuple[int, str]:
    """(runs, assumption): how many mixture runs a search over data-mixing proportions
    needs for the resolution of the DEM search in ``table`` (``search/candidates.json``),
    and the sentence that says how that number was reached.

    A grid search with step h gets the simplex grid of the same step, proportions in
    multiples of 1/r (r = 1/h rounded up) over n distributions: C(r + n - 1, n - 1)
    mixtures. Other strategies (random, gradient) get one run per distinct weighting
    they scored, ω rescaled to sum to 1 (the scale of ω has no mixing counterpart).
    """
    names = table["distributions"]
    n = len(names)
    omegas = _scalar_omegas(table["candidates"], names)
    if omegas is None:  # per-layer ω: mixing has nothing to match it with
        runs = len(table["candidates"])
        return runs, (
            f"Assumption: one mixture run per DEM candidate ({runs}); per-layer ω has no "
            "data-mixing counterpart, so this is a lower bound on what matching it would take."
        )
    step = _grid_step(omegas) if table.get("strategy") == "grid" else None
    if step is not None:
        r = max(1, math.ceil(1.0 / step - 1e-6))
        runs = math.comb(r + n - 1, n - 1)
        return runs, (
            f"Assumption: choosing the mixture proportions at the resolution of DEM's grid "
            f"(step {step:g}) means training one mixture per point of the simplex grid with "
            f"step 1/{r} over the {n} distributions, C({r}+{n}-1, {n}-1) = {runs} runs, each "
            "costing what one measured mixture run cost."
        )
    seen = {tuple(round(w / sum(omega), 6) for w in omega) for omega in omegas if sum(omega) > 0}
    runs = max(1, len(seen))
    return runs, (
        f"Assumption: one mixture run per distinct weighting the DEM search scored "
        f"({runs}, its {len(omegas)} ω rescaled to proportions that sum to 1), each costing "
        "what one measured mixture run cost."
    )


def cost_summary(
    items: dict[str, dict[str, Any]],
    candidates: dict[str, Any],
    mixtures: list[str],
    estimate: dict[str, Any],
) -> dict[str, Any]:
    """The cost section of the report: every item, DEM's total, the mixtures trained
    and a search over mixture proportions at DEM's resolution. ``items`` are keyed
    ``fine-tune NAME``, ``weight search``, ``data mixing LABEL`` (and the shared
    ``pretrain (shared base)``, counted for neither); ``estimate`` is one mixture run's
    cost, used when no mixture was trained."""
    dem_keys = [k for k in items if k.startswith("fine-tune") or k == "weight search"]
    mixing_keys = [f"data mixing {m}" for m in mixtures if f"data mixing {m}" in items]
    measured = items[mixing_keys[0]] if mixing_keys else estimate
    runs, assumption = mixing_search_size(candidates)
    per_wall = measured.get("wall_s")
    return {
        "items": items,
        "dem_total_flops": sum(items[k]["total_flops"] for k in dem_keys),
        "dem_tokens": sum(items[k]["tokens"] for k in dem_keys),
        "dem_wall_s": _sum_wall(items[k] for k in dem_keys),
        "mixing_runs": len(mixing_keys),
        "mixing_per_run_flops": measured["total_flops"],
        "mixing_total_flops": sum(items[k]["total_flops"] for k in mixing_keys),
        "mixing_total_tokens": sum(items[k]["tokens"] for k in mixing_keys),
        "mixing_wall_s": _sum_wall(items[k] for k in mixing_keys),
        "mixing_search": {
            "runs": runs,
            "measured_on": mixing_keys[0].removeprefix("data mixing ") if mixing_keys else None,
            "per_run_flops": measured["total_flops"],
            "per_run_tokens": measured["tokens"],
            "per_run_wall_s": per_wall,
            "total_flops": runs * measured["total_flops"],
            "total_tokens": runs * measured["tokens"],
            "total_wall_s": None if per_wall is None else runs * per_wall,
            "assumption": assumption,
        },
    }


def _sum_wall(items) -> float | None:
    walls = [c.get("wall_s") for c in items]
    return None if not walls or any(w is None for w in walls) else float(sum(walls))
