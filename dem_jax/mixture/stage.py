"""The ``dem-jax mixture`` stage: TaskPGM mixture proportions of a run's distributions.

Reads every fine-tune at ``RunLayout.model(name)`` and each distribution's held-out
records, tokenised unpacked (:func:`dem_jax.search.inputs.validation_batches`),
computes both similarity measures of :mod:`dem_jax.mixture.taskpgm` and writes
``output_dir/mixture/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dem_jax.config.run import RunConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.figures import pyplot, save_figure
from dem_jax.io.outputs import atomic_directory
from dem_jax.io.run_layout import RunLayout, check_run_paths
from dem_jax.mixture.taskpgm import similarity_jsd, similarity_pmi, taskpgm_proportions
from dem_jax.search.inputs import finetuned_models, validation_batches
from dem_jax.search.score import resolve_tokenizer
from dem_jax.sharding.distributed import is_main_process


def taskpgm_from_config(run: RunConfig, mesh=None, progress=None) -> dict[str, Any]:
    """The ``dem-jax mixture`` stage: TaskPGM proportions of ``data.distributions``.

    Loads every fine-tune, computes both similarity measures on the validation rows
    (PMI: N² forward passes; JSD: 2N(N−1) — both cheap next to training at
    validation sizes), solves for the proportions with the one
    ``pipeline.taskpgm.similarity`` names and writes ``output_dir/mixture/``
    atomically: ``proportions.json`` ({name: p}), ``similarity.json`` (``names``,
    ``similarity``: the measure the proportions used, and both matrices under
    ``pmi`` and ``jsd``) and ``heatmap.png`` (the measure used). Returns what was
    written, with ``"path"`` the directory.
    """
    check_run_paths(run)
    t = run.pipeline.taskpgm
    names = sorted(run.data.distributions)
    if len(names) < 2:
        raise DemError("TaskPGM: data.distributions needs at least two distributions")
    models = finetuned_models(run, names, mesh)
    tokenizer = resolve_tokenizer(run.data.tokenizer, models[0])
    batches = validation_batches(run, names, tokenizer, t.batch_size, t.max_examples)
    if progress is not None:
        progress(f"[mixture] PMI and JSD similarity of {len(names)} fine-tunes")
    params, config = [m.params for m in models], models[0].config
    matrices = {
        "pmi": similarity_pmi(params, config, batches),
        "jsd": similarity_jsd(params, config, batches),
    }
    S = matrices[t.similarity]
    p = taskpgm_proportions(S, lam=t.lam, beta=t.beta, method=t.method)
    proportions = {n: float(v) for n, v in zip(names, p, strict=True)}
    similarity = {
        "names": names,
        "similarity": t.similarity,
        **{k: v.tolist() for k, v in matrices.items()},
    }
    out = RunLayout(run.output_dir).mixture_dir
    storage.makedirs(out.parent)
    with atomic_directory(out, overwrite=True, signature=("proportions.json",)) as tmp:
        if is_main_process():
            (tmp / "proportions.json").write_text(json.dumps(proportions, indent=2) + "\n")
            (tmp / "similarity.json").write_text(json.dumps(similarity, indent=2) + "\n")
            _heatmap(S, names, p, t.similarity, tmp / "heatmap.png")
    if progress is not None:
        progress(f"[mixture] wrote {out}")
    return {"path": out, "proportions": proportions, **similarity}


def _heatmap(S: np.ndarray, names: list[str], p: np.ndarray, measure: str, path: Path) -> None:
    """The similarity matrix, annotated, with the proportions in the title."""
    plt = pyplot()
    if plt is None:  # matplotlib is optional; the JSON files carry everything
        return
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.0 * n + 2))
    im = ax.imshow(S, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{S[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=measure)
    ax.set_title("TaskPGM p: " + ", ".join(f"{m} {v:.2f}" for m, v in zip(names, p, strict=True)))
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
