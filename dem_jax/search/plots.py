"""Pictures of a weight search (matplotlib through :mod:`dem_jax.io.figures`).

Which picture depends on what was searched:

* gradient: the objective and each distribution's log-perplexity per step,
  and ω per step (averaged over layers when per layer);
* one distribution: objective and log-perplexity against ω;
* two distributions on a grid: the objective landscape over (ω_1, ω_2);
  two distributions sampled at random: the same as a scatter;
* otherwise: objective per candidate.

The chosen candidate is marked in every picture.
"""

from __future__ import annotations

import os

import numpy as np

from dem_jax.io.figures import pyplot, save_figure
from dem_jax.search.strategies import SearchResult


def plot_search(result: SearchResult, path: str | os.PathLike) -> bool:
    """Draw ``result`` into a PNG at ``path``; False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    omegas = np.array([c.omega for c in result.candidates])  # (n, k) or (n, k, L+1)
    objective = np.array([c.objective for c in result.candidates])
    mean_nll = np.array([c.mean_nll for c in result.candidates])  # (n, S)
    best = result.best_index
    k = len(result.names)
    if result.strategy == "gradient":
        fig = _gradient_figure(plt, result, omegas, objective, mean_nll, best)
    elif k == 1:
        fig = _line_figure(plt, result, omegas[:, 0], objective, mean_nll, best)
    elif k == 2:
        fig = _landscape_figure(plt, result, omegas, objective, best)
    else:
        fig = _candidates_figure(plt, result, objective, best)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def _objective_label(result: SearchResult) -> str:
    return f"objective ({result.objective})"


def _gradient_figure(plt, result, omegas, objective, mean_nll, best):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(objective) + 1)
    ax1.plot(steps, objective, "k-", lw=2, label=_objective_label(result))
    for i, name in enumerate(result.names):
        ax1.plot(steps, mean_nll[:, i], "--", label=f"log ppl {name}")
    ax1.plot(steps[best], objective[best], "r*", ms=14, label="chosen")
    ax1.set(xlabel="gradient step", ylabel="nats / token", title="validation loss")
    ax1.legend(fontsize=8)
    per_step = omegas if omegas.ndim == 2 else omegas.mean(axis=2)
    for i, name in enumerate(result.names):
        ax2.plot(steps, per_step[:, i], label=name)
    ax2.axvline(steps[best], color="r", ls=":")
    title = "ω per step" + (" (mean over layers)" if omegas.ndim == 3 else "")
    ax2.set(xlabel="gradient step", ylabel="ω", title=title)
    ax2.legend(fontsize=8)
    return fig


def _line_figure(plt, result, omega, objective, mean_nll, best):
    fig, ax = plt.subplots(figsize=(6, 4))
    order = np.argsort(omega)
    ax.plot(omega[order], objective[order], "ko-", label=_objective_label(result))
    for i, name in enumerate(result.names):
        ax.plot(omega[order], mean_nll[order, i], "--", label=f"log ppl {name}")
    ax.plot(omega[best], objective[best], "r*", ms=14, label="chosen")
    ax.set(xlabel=f"ω {result.names[0]}", ylabel="nats / token", title="validation loss")
    ax.legend(fontsize=8)
    return fig


def _landscape_figure(plt, result, omegas, objective, best):
    fig, ax = plt.subplots(figsize=(6, 5))
    x, y = omegas[:, 0], omegas[:, 1]
    xs, ys = np.unique(x), np.unique(y)
    if result.strategy == "grid" and len(xs) * len(ys) == len(objective) and len(xs) > 1:
        z = np.full((len(ys), len(xs)), np.nan)
        z[np.searchsorted(ys, y), np.searchsorted(xs, x)] = objective
        mesh = ax.pcolormesh(xs, ys, z, shading="nearest", cmap="viridis")
    else:
        mesh = ax.scatter(x, y, c=objective, cmap="viridis", s=40)
    fig.colorbar(mesh, ax=ax, label=_objective_label(result))
    ax.plot(x[best], y[best], "r*", ms=16, label="chosen")
    ax.set(xlabel=f"ω {result.names[0]}", ylabel=f"ω {result.names[1]}", title="search landscape")
    ax.legend(fontsize=8)
    return fig


def _candidates_figure(plt, result, objective, best):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(objective)), objective, "ko-", ms=3)
    ax.plot(best, objective[best], "r*", ms=14, label="chosen")
    ax.set(xlabel="candidate", ylabel=_objective_label(result), title=f"{result.strategy} search")
    ax.legend(fontsize=8)
    return fig
