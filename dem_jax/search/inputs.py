"""What the stages that score or compare a run's models read from its config and its
output directory: the distributions, the base model, the fine-tuned models at
``RunLayout.model(name)``, their distribution vectors, and the records training
holds out (:func:`dem_jax.data.pipeline.distribution_records`).

Used by the weight search (:mod:`dem_jax.search.run`), the TaskPGM stage
(:mod:`dem_jax.mixture.stage`) and the Fisher/RegMean baselines
(:mod:`dem_jax.pipeline.baselines`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from dem_jax.config.merge import DataOptions
from dem_jax.config.run import RunConfig
from dem_jax.data.pipeline import distribution_records
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import Model
from dem_jax.io.models import load_model
from dem_jax.io.run_layout import RunLayout
from dem_jax.merge.with_data import record_batches
from dem_jax.search.score import Progress
from dem_jax.vectors.store import is_vector_dir, load_vector
from dem_jax.vectors.vector import check_compatible, distribution_vector


def search_names(run: RunConfig) -> list[str]:
    """The distributions to merge: ``search.distributions`` or all configured ones."""
    configured = list(run.data.distributions)
    if not configured:
        raise DemError("data.distributions: no distributions configured")
    names = list(run.search.distributions or configured)
    for name in names:
        if name not in run.data.distributions:
            raise DemError(
                f"search.distributions: unknown distribution {name!r} "
                f"(configured: {', '.join(configured)})"
            )
    if len(set(names)) != len(names):
        raise DemError("search.distributions: a distribution is listed twice")
    return names


def validation_records(run: RunConfig, name: str) -> list[dict[str, Any]]:
    """A distribution's held-out records, exactly those training holds out."""
    return distribution_records(run.data, name)[1]


def base_model_path(run: RunConfig) -> Path:
    """``model.path``, or the run's own base model when it is initialised from scratch."""
    if run.model.path is not None:
        return storage.path(run.model.path)
    path = RunLayout(run.output_dir).base_model
    if not path.exists():
        raise DemError(f"{path}: base model not found (model.init runs write it when training)")
    return path


def finetuned_path(layout: RunLayout, name: str) -> Path:
    """``layout.model(name)``; DemError saying how to train it when it does not exist."""
    path = layout.model(name)
    if not path.exists():
        raise DemError(
            f"{path}: fine-tuned model for distribution {name!r} not found "
            f"(train it with: dem-jax train CONFIG.yaml --distribution {name})"
        )
    return path


def finetuned_models(run: RunConfig, names: list[str], mesh=None) -> list[Model]:
    """The fine-tuned model of each distribution, float32, all of one architecture."""
    layout = RunLayout(run.output_dir)
    models = []
    for name in names:
        path = finetuned_path(layout, name)
        models.append(load_model(path, mesh=mesh, dtype="float32"))
        check_compatible(models[0].config, models[-1].config, names[0], str(path))
    return models


def load_vectors(
    run: RunConfig,
    names: Sequence[str],
    base: Model,
    mesh: Mesh | None,
    progress: Progress | None = None,
) -> list[Any]:
    """ΔΘ_i per distribution, float32, on the base parameters' shardings: the saved
    vector at ``layout.vector(name)`` if there is one, else the fine-tuned model at
    ``layout.model(name)`` minus the base."""
    layout = RunLayout(run.output_dir)
    out = []
    for name in names:
        vector_dir = layout.vector(name)
        if is_vector_dir(vector_dir):
            vector = load_vector(vector_dir, mesh=mesh)
            check_compatible(base.config, vector.config, "base model", str(vector_dir))
            source = vector_dir
        else:
            model_dir = finetuned_path(layout, name)
            finetuned = load_model(model_dir, mesh=mesh)
            vector = distribution_vector(base, finetuned, name=name, model_path=model_dir)
            del finetuned  # only ΔΘ stays on device
            source = model_dir
        out.append(vector.params)
        if progress is not None:
            progress(f"search: distribution vector {name!r} from {source}")
    return out


def validation_batches(
    run: RunConfig, names: list[str], tokenizer, batch_size: int, max_examples: int = 0
) -> list[list[dict[str, np.ndarray]]]:
    """Each distribution's held-out records (the first ``max_examples``; 0 = all) as
    unpacked (B, T) batches, one document per row, the last one padded with rows
    without loss tokens (:func:`dem_jax.merge.with_data.record_batches`, tokenised as
    ``run.data`` says)."""
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
            validation_records(run, name), tokenizer, options, f"data.distributions.{name}"
        )
        for name in names
    ]
