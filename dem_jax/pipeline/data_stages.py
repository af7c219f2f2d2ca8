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
from dem_jax.config.run import RunConfig
from dem_jax.data.pipeline import distribution_records
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import Model, atomic_directory
from dem_jax.io.run_layout import RunLayout
from dem_jax.merge.config import DATA_METHODS, DataOptions
from dem_jax.merge.with_data import data_merge_params, record_batches
from dem_jax.sharding.distributed import is_main_process

FISHER_MERGES = DATA_METHODS  # pipeline baselines built here: fisher, regmean


def finetuned_models(run: RunConfig, names: list[str], mesh=None) -> list[Model]:
    """The fine-tuned model of each distribution, float32, all of one architecture."""
    from dem_jax.vectors.vector import check_compatible

    layout = RunLayout(run.output_dir)
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
    unpacked (B, T) batches, the last one padded with rows without loss tokens
    (:func:`dem_jax.data_merge.record_batches`, tokenised as ``run.data`` says)."""
    d = run.data
    options = DataOptions(
        seq_len=d.seq_len,
        batch_size=batch_size,
        max_examples=max_examples,
        prompt_template=d.prompt_template,
        add_bos=d.add_bos,
        add_eos=d.add_eos,
    )
    return [
        record_batches(
            distribution_records(d, name)[1], tokenizer, options, f"data.distributions.{name}"
        )
        for name in names
    ]


def _tokenizer(run: RunConfig, model: Model):
    from dem_jax.search.score import resolve_tokenizer

    return resolve_tokenizer(run.data.tokenizer, model)


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
    from dem_jax.mixture.taskpgm import similarity_jsd, similarity_pmi, taskpgm_proportions

    t = run.pipeline.taskpgm
    names = sorted(run.data.distributions)
    if len(names) < 2:
        raise DemError("TaskPGM: data.distributions needs at least two distributions")
    models = finetuned_models(run, names, mesh)
    batches = validation_batches(
        run, names, _tokenizer(run, models[0]), t.batch_size, t.max_examples
    )
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
    with atomic_directory(out, overwrite=True) as tmp:
        if is_main_process():
            (tmp / "proportions.json").write_text(json.dumps(proportions, indent=2) + "\n")
            (tmp / "similarity.json").write_text(json.dumps(similarity, indent=2) + "\n")
            _heatmap(S, names, p, t.similarity, tmp / "heatmap.png")
    if progress is not None:
        progress(f"[mixture] wrote {out}")
    return {"path": out, "proportions": proportions, **similarity}


def _heatmap(S: np.ndarray, names: list[str], p: np.ndarray, measure: str, path: Path) -> None:
    """The similarity matrix, annotated, with the proportions in the title."""
    from dem_jax.search.plots import _pyplot

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
    storage.save_figure(fig, path, dpi=110)
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
    ``pipeline.regmean_alpha``); see :func:`dem_jax.data_merge.data_merge_params`.
    With ``mesh`` the models are loaded onto it and every pass runs sharded
    (``search.batch_size`` must divide by data*fsdp).
    """
    if kind not in FISHER_MERGES:
        raise DemError(f"unknown data-aware merge {kind!r} (known: {', '.join(FISHER_MERGES)})")
    if mesh is not None:
        from dem_jax.search.score import check_batch_size

        check_batch_size(run.search.batch_size, mesh, "search.batch_size")
    models = finetuned_models(run, names, mesh)
    config = models[0].config
    batches = validation_batches(
        run,
        names,
        _tokenizer(run, models[0]),
        run.search.batch_size,
        run.pipeline.eval_max_examples,
    )
    if progress is not None:
        progress(f"[{kind}] statistics of {len(names)} fine-tunes on their validation rows")
    merged = data_merge_params(
        kind,
        [m.params for m in models],
        config,
        batches,
        mesh=mesh,
        alpha=run.pipeline.regmean_alpha,
    )
    return jax.block_until_ready(merged), config
