"""``dem-jax merge MERGE.yaml``: a parsed mergekit configuration run into an output
directory, by the leaf-by-leaf engine or, for methods that read data, by
:mod:`dem_jax.merge.with_data`."""

from __future__ import annotations

import os
from pathlib import Path

from jax.sharding import Mesh

from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.checkpoint import DEFAULT_MAX_SHARD_BYTES
from dem_jax.io.outputs import check_disjoint
from dem_jax.merge.engine import MergeInput
from dem_jax.merge.output import check_output, merge_to_directory
from dem_jax.merge.registry import get_method
from dem_jax.merge.request import MergeRequest, check_layer_ranges, load_merge_config
from dem_jax.merge.with_data import merge_with_data


def merge_from_config(
    config: str | os.PathLike | MergeRequest,
    out: str | os.PathLike,
    *,
    format: str = "hf",
    overwrite: bool = False,
    mesh: Mesh | None = None,
    streaming: bool = True,
    seed: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Run a mergekit MERGE.yaml (see :mod:`dem_jax.merge.request`) into ``out``.

    Methods that read data (fisher, regmean) run in memory through
    :func:`dem_jax.merge.with_data.merge_with_data` (``streaming`` and ``seed`` do not
    apply).
    """
    req = config if isinstance(config, MergeRequest) else load_merge_config(config)
    check_disjoint(out, req.input_paths(), "--out")
    check_output(out, format, overwrite)
    if seed is not None and seed < 0:
        raise DemError(f"--seed: expected a non-negative integer, got {seed}")
    inputs = [
        MergeInput(p, s, str(p)) for p, s in zip(req.models, req.model_parameters, strict=True)
    ]
    try:
        check_layer_ranges(req)
        if get_method(req.method).data:
            return merge_with_data(
                req,
                out,
                format=format,
                overwrite=overwrite,
                mesh=mesh,
                max_shard_bytes=max_shard_bytes,
                config_yaml=merge_yaml_text(req),
            )
        return merge_to_directory(
            out,
            req.method,
            req.base,
            inputs,
            format=format,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            streaming=streaming,
            parameters=req.parameters,
            seed=req.seed if seed is None else seed,
            mesh=mesh,
            dtype=req.dtype,
            out_dtype=req.out_dtype,
            tokenizer_source=req.tokenizer_source,
            config_yaml=merge_yaml_text(req),
        )
    except DemError as e:  # name the YAML file in every message about its contents
        where = str(req.source)
        raise DemError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def merge_yaml_text(req: MergeRequest) -> str | None:
    """The MERGE.yaml a request was read from, verbatim (None when built in code): the
    output's ``mergekit_config.yml`` and its model card quote it."""
    if req.source is None:
        return None
    try:
        return storage.path(req.source).read_text()
    except (OSError, UnicodeDecodeError):  # parsed a moment ago; gone or changed since
        return None
