"""The pipeline's data-aware merge baselines, Fisher (:mod:`dem_jax.merge.methods.fisher`)
and RegMean (:mod:`dem_jax.merge.methods.regmean`), from statistics of the fine-tunes
at ``RunLayout.model(name)`` on their own held-out records, tokenised unpacked (one
row = one document, as the Fisher's per-example definition needs)."""

from __future__ import annotations

from typing import Any

import jax

from dem_jax.config.run import RunConfig
from dem_jax.errors import DemError
from dem_jax.merge.registry import DATA_METHODS
from dem_jax.merge.with_data import merge_with_statistics
from dem_jax.search.inputs import finetuned_models, validation_batches
from dem_jax.search.score import resolve_tokenizer
from dem_jax.sharding.placement import check_batch_size

FISHER_MERGES = DATA_METHODS  # pipeline baselines built here: fisher, regmean


def fisher_regmean_params(
    run: RunConfig, kind: str, names: list[str], mesh=None, progress=None
) -> tuple[Any, Any]:
    """(float32 merged params, model config) of the ``kind`` (fisher or regmean)
    baseline over the fine-tunes of ``names``.

    Statistics come from each distribution's first ``pipeline.eval_max_examples``
    validation records, in ``search.batch_size`` batches: the diagonal Fisher of
    model i on distribution i (:func:`dem_jax.merge.methods.fisher.diagonal_fisher`),
    or its linear layers' input Grams (:func:`dem_jax.merge.methods.regmean.gram_matrices`,
    merged with ``pipeline.regmean_alpha``); see
    :func:`dem_jax.merge.with_data.merge_with_statistics`. With ``mesh`` the models are
    loaded onto it and every pass runs sharded (``search.batch_size`` must divide by
    data*fsdp*expert).
    """
    if kind not in FISHER_MERGES:
        raise DemError(f"unknown data-aware merge {kind!r} (known: {', '.join(FISHER_MERGES)})")
    if mesh is not None:
        check_batch_size(run.search.batch_size, mesh, "search.batch_size")
    models = finetuned_models(run, names, mesh)
    config = models[0].config
    batches = validation_batches(
        run,
        names,
        resolve_tokenizer(run.data.tokenizer, models[0]),
        run.search.batch_size,
        run.pipeline.eval_max_examples,
    )
    if progress is not None:
        progress(f"[{kind}] statistics of {len(names)} fine-tunes on their validation rows")
    settings = {"alpha": run.pipeline.regmean_alpha} if kind == "regmean" else {}
    merged, _, _ = merge_with_statistics(
        kind, [m.params for m in models], config, batches, mesh=mesh, parameters=settings
    )
    return jax.block_until_ready(merged), config
