"""Data-mixture proportions from the fine-tuned models (TaskPGM).

* :mod:`~dem_jax.mixture.taskpgm`: the similarity measures (PMI, JSD) of fine-tuned
  models and the TaskPGM proportions they give (pure);
* :mod:`~dem_jax.mixture.stage`: the ``dem-jax mixture`` stage: reads a run's
  fine-tunes and validation data, writes ``output_dir/mixture/``.
"""
