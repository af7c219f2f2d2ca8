"""The report's pictures (matplotlib through :mod:`dem_jax.io.figures`; skipped
without it): a perplexity heatmap, one training-curve panel per run with its
validation points, and the weight search's objective against each ω_i."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dem_jax.io.figures import pyplot, save_figure

MAX_PROFILE_POINTS = 40  # more distinct ω_i values than this (random search): no line


def report_plots(result: dict[str, Any], out: Path, root: Path) -> list[str]:
    """Write the pictures into ``out``; returns their file names."""
    plt = pyplot()
    if plt is None:
        return []
    made = [_heatmap(plt, result, out)]
    if _training_curves(plt, result, root, out):
        made.append("training_curves.png")
    table = root / "search" / "candidates.json"
    if table.exists() and _search_panels(plt, json.loads(table.read_text()), out):
        made.append("search.png")
    return made


def _heatmap(plt, result: dict[str, Any], out: Path) -> str:
    names, models = result["distributions"], list(result["models"])
    values = [[result["models"][m]["eval"][n]["nll"] for n in names] for m in models]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.0 + 0.42 * len(models)))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(models)), models)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{math.exp(v):.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_title("validation perplexity (colour: log scale)")
    fig.colorbar(im, ax=ax, label="NLL")
    fig.tight_layout()
    save_figure(fig, out / "heatmap.png", dpi=120)
    return "heatmap.png"


def run_order(stems: list[str], names: list[str]) -> list[str]:
    """Training runs in the order they ran: the base, the fine-tunes, then the rest."""
    rank = {"base": 0, **{n: 1 for n in names}}
    return sorted(stems, key=lambda s: (rank.get(s, 2), s))


def _training_curves(plt, result: dict[str, Any], root: Path, out: Path) -> bool:
    names = result["distributions"]
    logs = {p.stem: p for p in (root / "logs").glob("*.jsonl")}
    runs = run_order(list(logs), names)
    if not runs:
        return False
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs, strict=False):
        points = [json.loads(x) for x in logs[run].read_text().splitlines() if x.strip()]
        train = [(p["step"], p["loss"]) for p in points if p.get("kind") == "train"]
        if train:
            ax.plot(*zip(*train, strict=True), color="0.3", lw=1.2, label="train loss")
        own = [run] if run in names else names  # a fine-tune: its own distribution
        for n in own:
            val = [(p["step"], p["nll"]) for p in points if p.get("kind") == f"eval/{n}"]
            if val:
                color = f"C{names.index(n) % 10}"  # one colour per distribution throughout
                ax.plot(*zip(*val, strict=True), "o", ms=4, color=color, label=f"val {n}")
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("NLL (nats/token)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.suptitle("training loss per run, with validation NLL (points)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "training_curves.png", dpi=110)
    return True


def _omega_matrix(table: dict[str, Any]) -> tuple[np.ndarray, bool]:
    """(n candidates, k distributions) ω, and whether ω was per layer (then averaged)."""
    names = table["distributions"]
    per_layer = False
    rows = []
    for c in table["candidates"]:
        row = []
        for n in names:
            w = c["omega"][n]
            if isinstance(w, dict):  # {"layers": [...], "other": x}
                per_layer = True
                w = float(np.mean([*w["layers"], w["other"]]))
            row.append(float(w))
        rows.append(row)
    return np.array(rows), per_layer


def _search_panels(plt, table: dict[str, Any], out: Path) -> bool:
    names = table["distributions"]
    if not table["candidates"]:
        return False
    omega, per_layer = _omega_matrix(table)
    objective = np.array([c["objective"] for c in table["candidates"]])
    best = int(np.argmin(objective))
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 2.7 * rows), squeeze=False, sharey=True
    )
    for i, (ax, name) in enumerate(zip(axes.flat, names, strict=False)):
        x = omega[:, i]
        ax.scatter(x, objective, s=8, color="0.6", alpha=0.5, label="candidates")
        values = np.unique(np.round(x, 9))
        if len(values) <= MAX_PROFILE_POINTS:
            profile = [objective[np.isclose(x, v)].min() for v in values]
            ax.plot(values, profile, "k.-", lw=1.2, label="best at this ω")
        ax.plot(x[best], objective[best], "r*", ms=12, label="chosen")
        ax.set_xlabel(f"ω {name}" + (" (mean over layers)" if per_layer else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel(f"{table.get('objective', 'objective')} (nats/token)", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(
        f"weight search ({table.get('strategy')}, {len(objective)} candidates): "
        "validation objective against each ω",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, out / "search.png", dpi=110)
    return True
