"""What a weight search writes: the candidate table, the chosen ω, the plot and the
merged model Θ + Σ ω_i ΔΘ_i of the chosen ω."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dem_jax.io import storage
from dem_jax.io.modeldir import Model
from dem_jax.io.models import save_model
from dem_jax.io.outputs import atomic_directory
from dem_jax.search.plots import plot_search
from dem_jax.search.score import Progress
from dem_jax.search.scorer import Candidate, MergeScorer
from dem_jax.search.strategies import SearchResult


def omega_dict(omega: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """ω by distribution: a float, or {"layers": [...], "other": float} per layer."""
    omega = np.asarray(omega)
    if omega.ndim == 1:
        return {n: float(w) for n, w in zip(names, omega, strict=True)}
    return {
        n: {"layers": [float(x) for x in w[:-1]], "other": float(w[-1])}
        for n, w in zip(names, omega, strict=True)
    }


def candidate_record(c: Candidate, names: Sequence[str], set_names: Sequence[str]) -> dict:
    """A flat, JSON-able row of the candidate table."""
    row: dict[str, Any] = {}
    omega = np.asarray(c.omega)
    for i, n in enumerate(names):
        if omega.ndim == 1:
            row[f"omega_{n}"] = float(omega[i])
        else:
            row.update({f"omega_{n}_layer{l}": float(w) for l, w in enumerate(omega[i, :-1])})
            row[f"omega_{n}_other"] = float(omega[i, -1])
    for i, n in enumerate(set_names):
        mean = float(c.nll_sum[i] / c.tokens[i])
        row[f"nll_{n}"] = mean
        row[f"ppl_{n}"] = math.exp(mean)
        row[f"tokens_{n}"] = int(c.tokens[i])
    row["objective"] = c.objective
    row["forward_equivalents"] = c.forward_equivalents
    if c.grad is not None:
        row["grad_norm"] = float(np.linalg.norm(c.grad))
    return row


def write_search_outputs(
    result: SearchResult, scorer: MergeScorer, out_dir: Path, progress: Progress | None = None
) -> Path:
    """candidates.csv, candidates.json, chosen.json and search.png, written atomically."""
    names, sets = result.names, scorer.set_names
    rows = [candidate_record(c, names, sets) for c in result.candidates]
    best = result.best
    chosen = {
        "strategy": result.strategy,
        "objective": result.objective,
        "objective_value": best.objective,
        "candidate": result.best_index,
        "distributions": names,
        "omega": omega_dict(best.omega, names),
        "scores": {n: s.to_dict() for n, s in scorer.scores(best).items()},
        "candidates_tried": len(result.candidates),
        "forward_equivalents": scorer.forward_equivalents,
    }
    table = {
        "distributions": names,
        "strategy": result.strategy,
        "objective": result.objective,
        "candidates": [
            {
                "index": i,
                "omega": omega_dict(c.omega, names),
                "scores": {n: s.to_dict() for n, s in scorer.scores(c).items()},
                "objective": c.objective,
                "forward_equivalents": c.forward_equivalents,
                **({"grad": np.asarray(c.grad).tolist()} if c.grad is not None else {}),
            }
            for i, c in enumerate(result.candidates)
        ],
    }
    storage.makedirs(out_dir.parent)
    with atomic_directory(out_dir, overwrite=True, signature=("chosen.json",)) as tmp:
        if jax.process_index() == 0:
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=["index", *rows[0]])
            writer.writeheader()
            writer.writerows({"index": i, **r} for i, r in enumerate(rows))
            (tmp / "candidates.csv").write_text(text.getvalue())
            (tmp / "candidates.json").write_text(json.dumps(table, indent=2) + "\n")
            (tmp / "chosen.json").write_text(json.dumps(chosen, indent=2) + "\n")
            if not plot_search(result, tmp / "search.png") and progress is not None:
                progress("search: matplotlib is not installed; search.png skipped")
    return out_dir


def save_merged_model(result: SearchResult, scorer: MergeScorer, base: Model, out: Path) -> Path:
    """Θ + Σ ω_i ΔΘ_i for the chosen ω as a dem-jax model directory (atomic; replaces
    an earlier one only once complete)."""
    best = result.best
    metadata = {
        **base.metadata,
        "dem": {
            "base": None if base.assets_dir is None else str(base.assets_dir),
            "distributions": result.names,
            "omega": omega_dict(best.omega, result.names),
            "objective": result.objective,
            "objective_value": best.objective,
        },
    }
    merged = Model(
        base.config, scorer.merged_params(best.omega), base.hf_config, base.assets_dir, metadata
    )
    storage.makedirs(out.parent)
    return save_model(merged, out, format="orbax", overwrite=True)
