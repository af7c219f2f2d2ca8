"""``dem-jax merge MERGE.yaml``: a parsed mergekit configuration run into an output
directory: on the host executor (:mod:`dem_jax.merge.host`, NumPy) where it can, else
by the leaf-by-leaf JAX engine or, for methods that read data,
:mod:`dem_jax.merge.with_data`. The JAX modules are imported only for the latter
two (see :mod:`dem_jax.lazy`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.assets import has_tokenizer, stage_assets
from dem_jax.io.hf.directory import DEFAULT_MAX_SHARD_BYTES
from dem_jax.io.outputs import check_disjoint, check_output
from dem_jax.merge.host import ENGINES, run_host
from dem_jax.merge.registry import get_method
from dem_jax.merge.request import MergeRequest, check_layer_ranges, load_merge_config

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from dem_jax.merge.slices import MergeSlice


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
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    engine: str = "auto",
) -> Path:
    """Run a mergekit MERGE.yaml (see :mod:`dem_jax.merge.request`) into ``out``.

    Methods that read data (fisher, regmean) run in memory through
    :func:`dem_jax.merge.with_data.merge_with_data` (``streaming`` and ``seed`` do not
    apply). mergekit's options: ``copy_tokenizer`` False leaves the tokenizer out
    unless ``tokenizer_source`` names one (the generation config stays);
    ``allow_crimes`` merges models of different architectures whose tensors all agree.
    ``engine``: ``"auto"`` (the host executor where it can, else JAX), ``"host"`` (an
    error where it cannot) or ``"jax"``.
    """
    if engine not in ENGINES:
        raise DemError(f"--engine: must be one of {', '.join(ENGINES)}, got {engine!r}")
    req = config if isinstance(config, MergeRequest) else load_merge_config(config)
    check_disjoint(out, req.input_paths(), "--out")
    check_output(out, format, overwrite)
    if seed is not None and seed < 0:
        raise DemError(f"--seed: expected a non-negative integer, got {seed}")
    seed = req.seed if seed is None else seed
    try:
        check_layer_ranges(req)
        vocabulary = None
        if req.vocabulary is not None:  # tokenizer_source / tokenizer: (transformers)
            from dem_jax.merge.vocab import build_vocabulary

            vocabulary = build_vocabulary(req.vocabulary, req.base, req.models)
            if vocabulary.is_identity():  # one vocabulary: nothing to re-index
                vocabulary = None
        with output_assets(req, copy_tokenizer, vocabulary) as assets_dir:
            done = run_host(
                req,
                out,
                engine=engine,
                format=format,
                mesh=mesh,
                seed=seed,
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes,
                assets_dir=assets_dir,
                config_yaml=merge_yaml_text(req),
                vocabulary=vocabulary,
            )
            if done is not None:
                return done
            # the JAX engine (imported here: the host executor never needs it)
            from dem_jax.merge.engine import MergeInput
            from dem_jax.merge.output import merge_to_directory, write_plan
            from dem_jax.merge.slices import SlicePlan
            from dem_jax.merge.with_data import merge_with_data

            inputs = [
                MergeInput(p, s, str(p))
                for p, s in zip(req.models, req.model_parameters, strict=True)
            ]
            if get_method(req.method).data:
                return merge_with_data(
                    req,
                    out,
                    format=format,
                    overwrite=overwrite,
                    mesh=mesh,
                    max_shard_bytes=max_shard_bytes,
                    config_yaml=merge_yaml_text(req),
                    assets_dir=assets_dir,
                    allow_crimes=allow_crimes,
                )
            if req.slices is not None:
                plan = SlicePlan(
                    req.method,
                    slice_specs(req),
                    base=req.base,
                    parameters=req.parameters,
                    seed=seed,
                    mesh=mesh,
                    dtype=req.dtype,
                    out_dtype=req.out_dtype,
                    streaming=streaming,
                    tokenizer_source=assets_dir,
                    allow_crimes=allow_crimes,
                )
                return write_plan(
                    plan,
                    out,
                    format=format,
                    overwrite=overwrite,
                    max_shard_bytes=max_shard_bytes,
                    streaming=streaming,
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
                seed=seed,
                mesh=mesh,
                dtype=req.dtype,
                out_dtype=req.out_dtype,
                tokenizer_source=assets_dir,
                config_yaml=merge_yaml_text(req),
                allow_crimes=allow_crimes,
            )
    except DemError as e:  # name the YAML file in every message about its contents
        where = str(req.source)
        raise DemError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def slice_specs(req: MergeRequest) -> list[MergeSlice]:
    """The request's ``slices:`` as the slice engine takes them."""
    from dem_jax.merge.slices import LayerSource, MergeSlice

    return [
        MergeSlice(
            tuple(
                LayerSource(p, lr, settings, str(p), where)
                for p, lr, settings, where in zip(
                    s.models, s.layer_ranges, s.model_parameters, s.wheres, strict=True
                )
            ),
            s.base,
            s.parameters,
            s.where,
        )
        for s in req.slices or []
    ]


def donor_dir(req: MergeRequest) -> Path | None:
    """Whose tokenizer and generation files the output carries: ``tokenizer_source``,
    else the base model, else the first model (vectors have none), as in mergekit."""
    from dem_jax.vectors.store import is_vector_dir  # JAX; only without tokenizer_source

    if req.tokenizer_source is not None:
        return req.tokenizer_source
    candidates = [p for p in [req.base, *req.models] if p is not None]
    return next((p for p in candidates if not is_vector_dir(p)), None)


@contextlib.contextmanager
def output_assets(
    req: MergeRequest, copy_tokenizer: bool = True, vocabulary=None
) -> Iterator[Path | None]:
    """The folder whose asset files the output gets: ``req.tokenizer_source`` (None: the
    engine's choice), or a temporary copy of the donor's files without the tokenizer
    (``copy_tokenizer`` False, no ``tokenizer_source``) or with ``req.chat_template``;
    with a re-indexed ``vocabulary`` (:mod:`dem_jax.merge.vocab`), its tokenizer.

    mergekit writes a ``tokenizer_source``'s tokenizer even without copy_tokenizer, and
    only warns when a chat template has no tokenizer to go in; that is an error here.
    """
    if vocabulary is not None:  # the built tokenizer, whatever copy_tokenizer says
        with tempfile.TemporaryDirectory(prefix="dem_jax_vocab_") as built:
            stage_assets(donor_dir(req), built, tokenizer=False)  # the generation config
            vocabulary.tokenizer.save_pretrained(built)
            if req.chat_template is None:
                yield Path(built)
                return
            with tempfile.TemporaryDirectory(prefix="dem_jax_assets_") as tmp:
                stage_assets(built, tmp, chat_template=req.chat_template)
                yield Path(tmp)
        return
    tokenizer = copy_tokenizer or req.tokenizer_source is not None
    if tokenizer and req.chat_template is None:
        yield req.tokenizer_source
        return
    donor = donor_dir(req)
    if req.chat_template is not None:
        if not tokenizer:
            raise DemError(
                "chat_template: --no-copy-tokenizer leaves the output without a tokenizer "
                "to carry it (name a tokenizer_source, or drop one of the two)"
            )
        if not has_tokenizer(donor):
            raise DemError(f"chat_template: {donor} has no tokenizer to carry it")
    with tempfile.TemporaryDirectory(prefix="dem_jax_assets_") as tmp:
        stage_assets(donor, tmp, tokenizer=tokenizer, chat_template=req.chat_template)
        yield Path(tmp)


def merge_yaml_text(req: MergeRequest) -> str | None:
    """The MERGE.yaml a request was read from, verbatim (None when built in code): the
    output's ``mergekit_config.yml`` and its model card quote it."""
    if req.source is None:
        return None
    try:
        return storage.path(req.source).read_text()
    except (OSError, UnicodeDecodeError):  # parsed a moment ago; gone or changed since
        return None
