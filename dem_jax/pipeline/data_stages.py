"""Stages that run the fine-tuned models on their validation rows: TaskPGM mixture
proportions (:mod:`dem_jax.taskpgm`), and the Fisher (:mod:`dem_jax.fisher`) and
RegMean (:mod:`dem_jax.regmean`) merges.

Every stage reads the fine-tunes at ``RunLayout.model(name)`` and the records
training holds out (:func:`dem_jax.data.pipeline.distribution_records`), tokenised
unpacked (one row = one document, as the Fisher's per-example definition needs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dem_jax.api import load_model
from dem_jax.config import RunConfig
from dem_jax.data.pipeline import distribution_records
from dem_jax.errors import DemError
from dem_jax.layout import RunLayout
from dem_jax.modeldir import Model, atomic_directory

FISHER_MERGES = ("fisher", "regmean")  # pipeline baselines built here


def finetuned_models(run: RunConfig, names: list[str], mesh=None) -> list[Model]:
    """The fine-tuned model of each distribution, float32, all of one architecture."""
    from dem_jax.vectors import check_compatible

    layout = RunLayout(Path(run.output_dir))
    models = []
    for name in names:
        path = layout.model(name)
        if not path.exists():
            raise DemError(
                f"{path}: fine-tuned model for distribution {name!r} not found "
                f"(train it with: dem-jax train CONFIG.yaml --distribution {name})"
            )
        models.append(load_model(path, mesh=mesh, dtype="float32"))
        check_compatible(models[0].config, models[-1].config, names[0], str(path))
    return models


def validation_batches(
    run: RunConfig, names: list[str], tokenizer, batch_size: int, max_examples: int = 0
) -> list[list[dict[str, np.ndarray]]]:
    """Each distribution's held-out records (the first ``max_examples``; 0 = all) as
    unpacked (B, T) batches, the last one padded with rows without loss tokens."""
    from dem_jax.score import encode_records, pad_batches

    d = run.data
    out = []
    for name in names:
        records = distribution_records(d, name)[1]
        if max_examples:
            records = records[:max_examples]
        rows = encode_records(
            records, tokenizer, d.seq_len, False, d.prompt_template, d.add_bos, d.add_eos
        ).rows
        if not rows:
            raise DemError(f"data.distributions.{name}: no validation rows")
        out.append(pad_batches(rows, batch_size))
    return out


def _tokenizer(run: RunConfig, model: Model):
    from dem_jax.score import resolve_tokenizer

    return resolve_tokenizer(run.data.tokenizer, model)


def taskpgm_from_config(run: RunConfig, mesh=None, progress=None) -> dict[str, Any]:
    """The ``dem-jax mixture`` stage: TaskPGM proportions of ``data.distributions``.

    Loads every fine-tune, computes the similarity ``pipeline.taskpgm.similarity``
    (pmi or jsd) on the validation rows, solves for the proportions and writes
    ``output_dir/mixture/`` atomically: ``proportions.json`` ({name: p}),
    ``similarity.json`` (names, the measure, its matrix) and ``heatmap.png``.
    Returns what was written, with ``"path"`` the directory.
    """
    from dem_jax.taskpgm import similarity_jsd, similarity_pmi, taskpgm_proportions

    t = run.pipeline.taskpgm
    names = sorted(run.data.distributions)
    if len(names) < 2:
        raise DemError("TaskPGM: data.distributions needs at least two distributions")
    models = finetuned_models(run, names, mesh)
    batches = validation_batches(
        run, names, _tokenizer(run, models[0]), t.batch_size, t.max_examples
    )
    if progress is not None:
        progress(f"[mixture] {t.similarity} similarity of {len(names)} fine-tunes")
    measure = similarity_pmi if t.similarity == "pmi" else similarity_jsd
    S = measure([m.params for m in models], models[0].config, batches)
    p = taskpgm_proportions(S, lam=t.lam, beta=t.beta, method=t.method)
    proportions = {n: float(v) for n, v in zip(names, p, strict=True)}
    similarity = {"names": names, "similarity": t.similarity, t.similarity: S.tolist()}
    out = RunLayout(Path(run.output_dir)).mixture_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "proportions.json").write_text(json.dumps(proportions, indent=2) + "\n")
        (tmp / "similarity.json").write_text(json.dumps(similarity, indent=2) + "\n")
        _heatmap(S, names, p, t.similarity, tmp / "heatmap.png")
    if progress is not None:
        progress(f"[mixture] wrote {out}")
    return {"path": out, "proportions": proportions, **similarity}


def _heatmap(S: np.ndarray, names: list[str], p: np.ndarray, measure: str, path: Path) -> None:
    """The similarity matrix, annotated, with the proportions in the title."""
    from dem_jax.plots import _pyplot

    plt = _pyplot()
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fisher_regmean_params(
    run: RunConfig, kind: str, names: list[str], mesh=None, progress=None
) -> tuple[Any, Any]:
    """(float32 merged params, model config) of the ``kind`` (fisher or regmean)
    baseline over the fine-tunes of ``names``.

    Statistics come from each distribution's first ``pipeline.eval_max_examples``
    validation records, in ``search.batch_size`` batches: the diagonal Fisher of
    model i on distribution i (:func:`dem_jax.fisher.diagonal_fisher`), or its
    linear layers' input Grams (:func:`dem_jax.regmean.gram_matrices`, merged with
    ``pipeline.regmean_alpha``).
    """
    from dem_jax.fisher import diagonal_fisher, fisher_merge
    from dem_jax.regmean import gram_matrices, regmean_merge

    if kind not in FISHER_MERGES:
        raise DemError(f"unknown data-aware merge {kind!r} (known: {', '.join(FISHER_MERGES)})")
    models = finetuned_models(run, names, mesh)
    config = models[0].config
    batches = validation_batches(
        run,
        names,
        _tokenizer(run, models[0]),
        run.search.batch_size,
        run.pipeline.eval_max_examples,
    )
    params = [m.params for m in models]
    if progress is not None:
        progress(f"[{kind}] statistics of {len(names)} fine-tunes on their validation rows")
    if kind == "fisher":
        stats = [diagonal_fisher(p, config, b) for p, b in zip(params, batches, strict=True)]
        merged = fisher_merge(params, stats)
    else:
        stats = [gram_matrices(p, config, b) for p, b in zip(params, batches, strict=True)]
        merged = regmean_merge(params, stats, alpha=run.pipeline.regmean_alpha)
    return jax.block_until_ready(merged), config
