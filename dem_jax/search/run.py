"""The ``dem-jax search`` stage: merge weights ω chosen by validation perplexity.

DEM's merged model is Θ + Σ_i ω_i ΔΘ_i. From a run config this loads the base,
every distribution vector and every validation set onto the mesh
(:func:`build_scorer`), searches ω (:func:`dem_jax.search.strategies.run_search`)
and writes the candidate table, the chosen ω, the plot and the merged model
(:mod:`dem_jax.search.outputs`).
"""

from __future__ import annotations

from jax.sharding import Mesh

from dem_jax.config.run import RunConfig
from dem_jax.data.batches import encode_records
from dem_jax.data.tokenize import check_tokenizer_fits, load_tokenizer
from dem_jax.io.models import load_model, read_model_config
from dem_jax.io.run_layout import RunLayout, check_run_paths
from dem_jax.search.inputs import base_model_path, load_vectors, search_names, validation_records
from dem_jax.search.objective import objective_weights
from dem_jax.search.outputs import save_merged_model, write_search_outputs
from dem_jax.search.score import Progress
from dem_jax.search.scorer import MergeScorer
from dem_jax.search.strategies import SearchResult, grid_bounds, run_search
from dem_jax.sharding.rules import make_mesh


def build_scorer(run: RunConfig, mesh: Mesh | None = None, progress: Progress | None = None):
    """(scorer, base model, distribution names) for a run: the base, every
    distribution vector and every validation set loaded onto ``mesh`` (default:
    the config's ``mesh`` section)."""
    names = search_names(run)
    weights = objective_weights(run.search, names)
    if run.search.strategy in ("grid", "bayes"):
        grid_bounds(run.search, names)  # bad grid keys fail before anything is loaded
    records = {name: validation_records(run, name) for name in names}
    if mesh is None:
        mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, expert=run.mesh.expert)
    # The tokenizer is checked against the base's config before any weights are read.
    base_path = base_model_path(run)
    tokenizer = load_tokenizer(run.data.tokenizer or base_path)
    check_tokenizer_fits(tokenizer, read_model_config(base_path).vocab_size, str(base_path))
    d = run.data
    # Always packed, whatever data.packing says for training: the same sums, fewer rows.
    sets = {
        name: encode_records(
            recs, tokenizer, d.seq_len, True, d.prompt_template, d.add_bos, d.add_eos
        )
        for name, recs in records.items()
    }
    # The dtype training fine-tuned in, so ΔΘ = Θ_i − Θ is taken at full precision.
    base = load_model(base_path, mesh=mesh, dtype=run.train.param_dtype)
    vectors = load_vectors(run, names, base, mesh, progress)
    scorer = MergeScorer(
        base.config,
        base.params,
        vectors,
        sets,
        run.search.batch_size,
        mesh,
        run.search.max_batches,
        run.search.objective,
        weights,
    )
    return scorer, base, names


def search_from_config(
    run: RunConfig,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
    save_merged: bool = True,
    scorer_and_base=None,
) -> SearchResult:
    """The ``dem-jax search`` stage: load the base, the vectors and the validation
    data, search ω, write the table, the chosen ω, the plot and the merged model.

    ``mesh`` defaults to the config's ``mesh`` section; ``scorer_and_base`` reuses
    what :func:`build_scorer` returned.
    """
    check_run_paths(run)
    scorer, base, names = scorer_and_base or build_scorer(run, mesh, progress)
    result = run_search(scorer, run.search, names, progress)
    layout = RunLayout(run.output_dir)
    write_search_outputs(result, scorer, layout.search_dir, progress)
    if save_merged:
        save_merged_model(result, scorer, base, layout.merged_model)
        if progress is not None:
            progress(f"search: wrote merged model {layout.merged_model}")
    return result
