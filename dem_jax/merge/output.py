"""Writing merged models: a model in memory saved as Orbax or Hugging Face, or a
streaming merge written to Hugging Face shards leaf by leaf, complete or absent.

    merge_to_directory("out", "ties", "base/", [MergeInput("ft1/", {"weight": 1, "density": 0.5})])
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dem_jax.io import storage
from dem_jax.io.hf.checkpoint import DEFAULT_MAX_SHARD_BYTES, finish_hf_directory, hf_writer
from dem_jax.io.hf.config import to_hf_config
from dem_jax.io.hf.weights import hf_names, hf_tensor_specs, per_tensor
from dem_jax.io.modeldir import Model
from dem_jax.io.models import save_model
from dem_jax.io.outputs import atomic_directory, check_output
from dem_jax.io.progress_bar import progress_bar
from dem_jax.io.tree import set_leaf
from dem_jax.merge.engine import MergePlan
from dem_jax.model.transformer import param_shapes


def merge_to_directory(
    out: str | os.PathLike,
    method: str,
    base,
    models,
    *,
    format: str = "orbax",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    streaming: bool = True,
    config_yaml: str | None = None,
    **options,
) -> Path:
    """Merge and write ``out`` as ``"orbax"`` or ``"hf"``, atomically (complete or absent).

    With ``streaming`` and ``format="hf"`` each merged leaf is written as soon as
    it is computed, so peak memory is one parameter per input plus one output
    leaf; an Orbax output is collected on the mesh first and saved at the end.
    ``config_yaml`` (the MERGE.yaml text) is kept in the provenance, so the output's
    model card quotes it and its ``mergekit_config.yml`` holds it.
    """
    check_output(out, format, overwrite)
    run = MergePlan(method, base, models, streaming=streaming, **options)
    return write_plan(
        run,
        out,
        format=format,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        streaming=streaming,
        config_yaml=config_yaml,
    )


def write_plan(
    run: MergePlan,
    out: str | os.PathLike,
    *,
    format: str = "orbax",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    streaming: bool = True,
    config_yaml: str | None = None,
) -> Path:
    """Run a built plan (a :class:`MergePlan` or a slice merge's) into ``out`` as
    :func:`merge_to_directory` does, closing it."""
    try:
        metadata = run.metadata()
        if config_yaml is not None:
            metadata["merge"]["config_yaml"] = config_yaml
        if streaming and format == "hf":
            return _write_hf(run, out, overwrite, max_shard_bytes, metadata)
        model = _collect(run, f"merging into {storage.path(out).name}")
        model.metadata = metadata
    finally:
        run.close()
    return write_model(
        model, out, format=format, overwrite=overwrite, max_shard_bytes=max_shard_bytes
    )


def write_model(
    model: Model,
    out: str | os.PathLike,
    *,
    format: str = "orbax",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a merged model held in memory as ``"orbax"`` or ``"hf"``, complete or absent."""
    kwargs = {"max_shard_bytes": max_shard_bytes} if format == "hf" else {}
    return save_model(model, out, format=format, overwrite=overwrite, **kwargs)


def _host(leaf: jax.Array) -> np.ndarray:
    if not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _collect(run: MergePlan, desc: str) -> Model:
    """The merged model on its shardings, as ``run.to_model()``, with a progress bar over
    the merged bytes (each leaf waited for, so the rate and ETA are the merge's)."""
    config = run.output_config()
    itemsize = jnp.dtype(config.param_dtype).itemsize
    total = sum(math.prod(s.shape) * itemsize for s in jax.tree.leaves(param_shapes(config)))
    params: dict = {}
    with progress_bar(total, desc) as bar:
        for tmap, leaf in run.leaves():
            set_leaf(params, tmap.path, jax.block_until_ready(leaf))
            bar.update(leaf.nbytes)
    return Model(config, params, run.hf_config, run.assets_dir, run.metadata())


def _write_hf(run: MergePlan, out, overwrite: bool, max_shard_bytes: int, metadata) -> Path:
    """Write the merge as a Hugging Face directory, one leaf at a time; ``metadata``
    (the merge's provenance) makes its model card."""
    config = run.output_config()
    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    with atomic_directory(out, overwrite) as tmp:
        specs = hf_tensor_specs(config, np_dtype)
        with hf_writer(
            tmp, specs, max_shard_bytes, f"merging into {storage.path(out).name}"
        ) as writer:
            for tmap, leaf in run.leaves():
                host = _host(leaf)
                del leaf
                layers = per_tensor(host, tmap)
                names = hf_names(tmap, config)
                for name, one in zip(names, layers, strict=True):
                    rows = math.prod(one.shape[: tmap.split])
                    mat = one.reshape(rows, -1) if tmap.split < one.ndim else one.reshape(rows)
                    writer.write(name, np.ascontiguousarray(mat.T if tmap.transpose else mat))
        finish_hf_directory(tmp, to_hf_config(config, run.hf_config), run.assets_dir, metadata)
    return storage.path(out)
