"""mergekit's rules for which output slice merges which tensor, shared by the JAX
slice engine (:mod:`dem_jax.merge.slices`) and the host executor
(:mod:`dem_jax.merge.host`). JAX-free.

mergekit 0.1.5 (``plan.py::MergePlanner``): each slice merges its own layers; the
embeddings are merged over the first slice's sources, the final norm and ``lm_head``
over the last slice's, zipped with the first slice's source list (so only as many of
them as the first slice has).
"""

from __future__ import annotations

from dem_jax.errors import DemError
from dem_jax.io.hf.weights import TensorMap


def slices_of(tmap: TensorMap, count: int) -> list[int]:
    """Which of ``count`` output slices merge ``tmap``: every slice its own layers, the
    embeddings the first, the final norm and lm_head the last."""
    if tmap.stacked:
        return list(range(count))
    return [0] if tmap.path[0] == "embed" else [count - 1]


def final_inputs(first_sources: int, last_sources: int, last_base: int | None, where: str) -> int:
    """How many of the last slice's inputs (its sources but its base, in order) merge the
    final norm and lm_head: those among its first ``first_sources`` sources. A DemError
    when that cut leaves out the slice's base."""
    kept = range(min(first_sources, last_sources))
    if last_base is not None and last_base not in kept:
        raise DemError(
            f"{where}: the final norm and lm_head are merged over its first {first_sources} "
            "source(s), as in mergekit, which leaves out its base"
        )
    return len([i for i in kept if i != last_base])
