"""DEM's weight search: ω for the merged model Θ + Σ_i ω_i ΔΘ_i, chosen by validation
perplexity, and the scoring it rests on.

* :mod:`~dem_jax.search.score`: perplexity, mean NLL and bits per byte of one model
  per distribution (``dem-jax score``);
* :mod:`~dem_jax.search.edit`: the edited parameters Θ + Σ ω_i ΔΘ_i (pure);
* :mod:`~dem_jax.search.objective`: the search objectives over per-distribution
  log-perplexities (pure);
* :mod:`~dem_jax.search.scorer`: :class:`~dem_jax.search.scorer.MergeScorer`, every
  candidate ω scored by one jitted scan over validation batches held on the mesh;
* :mod:`~dem_jax.search.strategies`: grid, random, bayes (Optuna TPE) and gradient search, and
  :class:`~dem_jax.search.strategies.SearchResult`;
* :mod:`~dem_jax.search.inputs`: what a run's stages read: distributions, base
  model, fine-tunes, distribution vectors, validation records and batches;
* :mod:`~dem_jax.search.outputs`: the candidate table, chosen ω and merged model;
* :mod:`~dem_jax.search.plots`: the search's picture;
* :mod:`~dem_jax.search.run`: the ``dem-jax search`` stage from a run config.
"""
