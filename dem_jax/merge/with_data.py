"""Data-aware merges of whole models (fisher, regmean: :mod:`dem_jax.merge.methods`), each
model's statistics taken on its own distribution's data.

    batches = [record_batches(read_jsonl(f), tokenizer, DataOptions(), f) for f in files]
    merged, _, _ = merge_with_statistics("fisher", [m.params for m in models], config, batches)

The one implementation behind ``dem-jax merge`` with ``merge_method: fisher`` or
``regmean`` (dem-jax extensions of mergekit's YAML, see :mod:`dem_jax.merge.request`;
:func:`merge_with_data`) and the pipeline's fisher / regmean baselines. Unlike the
other methods these need every input whole (forward and backward passes over data),
so the inputs are loaded onto the mesh rather than streamed leaf by leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dem_jax.config.merge import DataOptions
from dem_jax.data.batches import encode_records, pad_batches
from dem_jax.data.records import read_jsonl
from dem_jax.data.tokenize import check_ids_fit, check_tokenizer_fits, load_tokenizer
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.checkpoint import DEFAULT_MAX_SHARD_BYTES
from dem_jax.io.modeldir import Model
from dem_jax.io.models import load_model, read_model_config
from dem_jax.io.outputs import check_disjoint, check_output
from dem_jax.merge.output import write_model
from dem_jax.merge.params import Settings, resolve, settings_chain
from dem_jax.merge.registry import DATA_METHODS, get_method
from dem_jax.merge.request import MergeRequest
from dem_jax.sharding.placement import check_batch_size, place_params
from dem_jax.sharding.rules import param_shardings
from dem_jax.vectors.store import is_vector_dir
from dem_jax.vectors.vector import check_compatible

Batch = dict[str, np.ndarray]


def record_batches(
    records: Sequence[Mapping[str, Any]], tokenizer, options: DataOptions, where: str
) -> list[Batch]:
    """The first ``options.max_examples`` records (0 = all) as (B, T) batches of unpacked
    rows (one document per row, as the Fisher's per-example definition needs; a longer
    one split into rows), the last batch padded with rows without loss tokens.
    DemError naming ``where`` when no row has a loss token."""
    o = options
    if o.max_examples:
        records = records[: o.max_examples]
    rows = encode_records(
        records, tokenizer, o.seq_len, False, o.prompt_template, o.add_bos, o.add_eos
    ).rows
    if not any(r["loss_mask"].any() for r in rows):
        raise DemError(f"{where}: no rows with loss tokens (records too short?)")
    return pad_batches(rows, o.batch_size)


def merge_with_statistics(
    method: str,
    params_list: Sequence[Any],
    config,
    batches: Sequence[Sequence[Mapping[str, Any]]],
    *,
    mesh: Mesh | None = None,
    model_parameters: Sequence[Mapping[str, Any] | None] | None = None,
    parameters: Settings | Sequence[Settings] | None = None,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """float32 merge of ``params_list`` (N models of one architecture, ``config``) by a
    data-aware ``method``, model i's statistics computed on ``batches[i]``.

    ``model_parameters`` (one mapping per model) and ``parameters`` (global, or a
    chain of them, highest precedence first) hold
    single numbers; unset ones take the method's defaults. With ``mesh`` every pass
    runs sharded (parameters by the sharding rules, batches over data*fsdp*expert) and the
    result lies on the parameters' shardings. Returns (merged parameters, resolved
    per-model parameters, resolved global parameters).
    """
    m = get_method(method)
    if not m.data:
        raise DemError(f"merge_method {m.name} reads no data (only {', '.join(DATA_METHODS)} do)")
    if len(params_list) != len(batches):
        raise DemError(f"{method}: {len(params_list)} models but {len(batches)} data sets")
    for i, model_batches in enumerate(batches):
        arrays = (np.asarray(b[k]) for b in model_batches for k in ("tokens", "targets"))
        check_ids_fit(arrays, config.vocab_size, f"{method}: data of model {i}")
    settings = model_parameters or [None] * len(params_list)
    labels = [f"models[{i}]" for i in range(len(params_list))]
    per_model, shared = resolve_scalars(m, settings, parameters, labels)
    # Statistics come back on the mesh: the parameters they are merged with go there too.
    params_list = [place_params(p, config, mesh) for p in params_list]
    merged = m.merge_models(params_list, config, batches, mesh, per_model, shared)
    if mesh is not None:
        merged = jax.device_put(merged, param_shardings(config, mesh))
    return merged, per_model, shared


def resolve_scalars(
    method, model_settings: Sequence[Settings | None], parameters, labels: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-model values, shared values) of a data-aware method's parameters, defaults
    filled in and checked by the method (at least ``min_models`` models). Settings are
    single numbers."""
    if len(model_settings) < method.min_models:
        raise DemError(
            f"merge_method {method.name} needs at least {method.min_models} models, "
            f"got {len(model_settings)}"
        )
    chain = settings_chain(parameters)
    per_model = [
        {s.name: resolve(s, [own, *chain], "", 0.0, label) for s in method.params if s.per_model}
        for own, label in zip(model_settings, labels, strict=True)
    ]
    shared = {
        s.name: resolve(s, chain, "", 0.0, "parameters") for s in method.params if not s.per_model
    }
    method.check_scalars(per_model, shared)
    return per_model, shared


def _check_model_dirs(req: MergeRequest) -> None:
    for path in req.models:
        if is_vector_dir(path):
            raise DemError(
                f"{path}: merge_method {req.method} needs model directories, not distribution "
                "vectors (it runs each model on its data)"
            )


def _load_inputs(req: MergeRequest, mesh: Mesh | None, allow_crimes: bool | None) -> list:
    """Every input model, on the mesh; all of one architecture."""
    _check_model_dirs(req)
    models = []
    for path in req.models:
        models.append(load_model(path, mesh=mesh))
        check_compatible(
            models[0].config, models[-1].config, str(req.models[0]), str(path), allow_crimes
        )
    return models


def merge_with_data(
    req: MergeRequest,
    out: str | os.PathLike,
    *,
    format: str = "hf",
    overwrite: bool = False,
    mesh: Mesh | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_yaml: str | None = None,
    assets_dir=None,
    allow_crimes: bool | None = None,
) -> Path:
    """Run a parsed MERGE.yaml whose method reads data (fisher, regmean) into ``out``.

    Order, so that bad input fails before any weights are read: parameters, the
    tokenizer (``tokenizer_source``, else ``base_model``, else the first model's;
    the output carries its files), every data file tokenised into batches
    (``req.data_options``), then the models (loaded on ``mesh``, rounded to
    ``dtype`` when given, statistics in float32). The merge is cast to
    ``out_dtype`` (default ``dtype``, else the inputs' promoted dtype) and written
    complete-or-absent by :func:`dem_jax.merge.output.write_model`, with
    ``config_yaml`` (the MERGE.yaml text) in its provenance and model card, and the
    asset files of ``assets_dir`` (default: the tokenizer's directory).
    ``allow_crimes``: see :func:`dem_jax.vectors.vector.check_compatible`.
    """
    check_disjoint(out, req.input_paths(), "--out")
    check_output(out, format, overwrite)
    opts = req.data_options or DataOptions()
    if mesh is not None:
        check_batch_size(opts.batch_size, mesh, "batch_size")
    method = get_method(req.method)
    # Every parameter resolved and checked before any data or weights are read.
    labels = [str(p) for p in req.models]
    resolve_scalars(method, req.model_parameters, req.parameters, labels)
    _check_model_dirs(req)
    tokenizer_dir = req.tokenizer_source or req.base or req.models[0]
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = read_model_config(req.models[0]).vocab_size
    check_tokenizer_fits(tokenizer, vocab_size, str(req.models[0]))
    batches = [
        record_batches(read_jsonl(path), tokenizer, opts, str(path)) for path in req.model_data
    ]
    for path, model_batches in zip(req.model_data, batches, strict=True):
        arrays = (b[k] for b in model_batches for k in ("tokens", "targets"))
        check_ids_fit(arrays, vocab_size, str(path))
    models = _load_inputs(req, mesh, allow_crimes)
    config = models[0].config

    def as_input(x):  # mergekit rounds its inputs to `dtype` when loading
        return (x.astype(req.dtype) if req.dtype else x).astype(jnp.float32)

    stored = functools.reduce(jnp.promote_types, [jnp.dtype(m.config.param_dtype) for m in models])
    params = [jax.tree.map(as_input, m.params) for m in models]
    del models[1:]  # only the first's config and assets are kept
    merged, per_model, shared = merge_with_statistics(
        req.method,
        params,
        config.replace(param_dtype="float32", dtype="float32"),
        batches,
        mesh=mesh,
        model_parameters=req.model_parameters,
        parameters=req.parameters,
    )
    del params
    out_dtype = req.out_dtype or req.dtype or str(stored)
    metadata = {
        "merge": {
            "method": req.method,
            "base": None if req.base is None else str(req.base),
            "models": [str(p) for p in req.models],
            "data": [str(p) for p in req.model_data],
            "parameters": {"models": per_model, **shared},
            "data_options": dataclasses.asdict(opts),
            **({"config_yaml": config_yaml} if config_yaml is not None else {}),
        }
    }
    model = Model(
        config.replace(param_dtype=out_dtype),
        jax.tree.map(lambda x: x.astype(out_dtype), merged),
        models[0].hf_config,
        storage.path(tokenizer_dir if assets_dir is None else assets_dir),
        metadata,
    )
    return write_model(
        model, out, format=format, overwrite=overwrite, max_shard_bytes=max_shard_bytes
    )
