"""``dem-jax pipeline``: the whole DEM method from one config.

base (given, or pretrained for tiny configs) -> one fine-tune per distribution
-> distribution vectors -> weight search on validation perplexity -> the DEM
model -> baselines (data mixing runs, TaskPGM proportions among them; uniform
soup, task arithmetic, TIES, DARE over the same vectors; Fisher and RegMean
merges of the fine-tunes) -> evaluation -> report -> Hugging Face export.

Each stage's output is kept under ``output_dir``; a re-run skips what is
complete and still valid, so adding a distribution trains only that one and
re-merges.
"""

from dem_jax.pipeline.run import PipelineResult, run_pipeline

__all__ = ["PipelineResult", "run_pipeline"]
