"""A MERGE.yaml turned into what a merge needs: checked paths and settings.

The file is read by the run configs' loader into :class:`~dem_jax.config.merge.MergeConfig`
(mergekit 0.1.5's ``mergekit/config.py`` format). What we follow: ``models``, or
``slices`` (output slices, each merging its sources' ``layer_range``s of one length:
layer stacking and slice merges, :mod:`dem_jax.merge.slices`; a slice's ``base_model``,
else the top-level one, is the source naming that model, and mergekit's requirement that
it be listed is relaxed where the sources share one range: it is then read there);
``base_model``; ``parameters`` at the top, per slice and per model (resolved by
:mod:`dem_jax.merge.params`); ``dtype`` (inputs are rounded to it before merging);
``out_dtype``; ``tokenizer_source`` (``base`` or a model path; its tokenizer files
are copied); ``chat_template`` (``auto``, a template mergekit ships, or a Jinja
template: :mod:`dem_jax.merge.chat_template`); ``random_seed`` (a dem-jax key that
mergekit ignores).

``tokenizer_source: union`` and the ``tokenizer`` section (models with different
vocabularies, :mod:`dem_jax.merge.vocab`) with ``models:`` or ``slices:``.

``modules: {default: ...}`` (mergekit's per-module form; our families have one
module, ``default``) is the same merge, its ``parameters`` one scope between a slice's
and the top-level ones. ``residual_weight`` is ignored with a warning (as mergekit 0.1.5
ignores it).

Refused with a DemError (mergekit has it, we do not): other module names;
several slices or partial layer ranges for the data-aware methods; vocabulary merging
with the data-aware methods; LoRA (``model+lora``) and
Hub references (model paths must be HF or dem-jax directories, relative to the YAML's
folder). Stricter than mergekit: unknown keys and parameters the method does not take
are errors (mergekit ignores them), ``density``/``gamma`` and slerp's ``t`` must lie in [0, 1].
We always compute in float32 (mergekit computes in ``dtype``).

**Data-aware methods (dem-jax extensions; mergekit has neither).** ``fisher`` and
``regmean`` (:mod:`dem_jax.merge.methods`) need, per model, ``data: FILE.jsonl``
(relative to the YAML's folder; records ``{"text"}`` or ``{"prompt", "completion"}``),
and take top-level batching keys (:class:`~dem_jax.config.merge.DataOptions`). Their
parameters are single numbers (no gradients or filters). ``base_model`` is optional
and not merged; the tokenizer for the data comes from ``tokenizer_source``, else
``base_model``, else the first model. ``data`` or a batching key on any other method
is an error, as is a data-aware method without ``data`` for every model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dem_jax.config.loader import load_yaml, parse_config
from dem_jax.config.merge import (
    DEFAULT_MODULE,
    DataOptions,
    MergeConfig,
    ModelEntry,
    OutputSlice,
)
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import HF_CONFIG, model_format
from dem_jax.merge.chat_template import resolve_chat_template
from dem_jax.merge.method import MergeMethod
from dem_jax.merge.params import check_parameters, check_scalar_settings
from dem_jax.merge.registry import DATA_METHODS, get_method
from dem_jax.merge.vocab import VocabularySpec, vocabulary_spec

DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataOptions))


@dataclass
class SliceRequest:
    """One entry of ``slices:``: its sources in order (the base among them when the
    method keeps the base apart), their layer ranges and settings."""

    models: list[Path]
    layer_ranges: list[tuple[int, int]]
    model_parameters: list[dict[str, Any]]
    wheres: list[str]  # where each source was written ("slices[1].sources[0]")
    base: int | None = None  # which source is the slice's base
    parameters: dict[str, Any] = field(default_factory=dict)  # the slice's own settings
    where: str = "slices[0]"


@dataclass
class MergeRequest:
    """A parsed MERGE.yaml: everything :func:`dem_jax.merge.output.merge_to_directory` needs."""

    method: str
    base: Path | None
    models: list[Path]
    model_parameters: list[dict[str, Any]]  # one settings mapping per model
    parameters: list[dict[str, Any]] = field(default_factory=list)  # chain, highest first
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Path | None = None  # whose tokenizer files the output gets
    vocabulary: VocabularySpec | None = None  # tokenizer_source / tokenizer: (merge/vocab.py)
    chat_template: str | None = None  # the template the output's tokenizer gets (the text)
    seed: int = 0
    source: Path | None = None  # the YAML file
    # Per model: (start, end) from a slice source, None for `models:`; checked against
    # the model's depth once its config is read.
    layer_ranges: list[tuple[int, int] | None] = field(default_factory=list)
    # `slices:` (every method but the data-aware ones): the output slices; then `models`
    # lists each model they read once (model_parameters are empty, the slices hold them)
    # and `base` is the top-level base_model (the output's config and tokenizer).
    slices: list[SliceRequest] | None = None
    # Data-aware methods only: one JSONL file per model, and how to batch them.
    model_data: list[Path | None] = field(default_factory=list)
    data_options: DataOptions | None = None

    def input_paths(self) -> list[tuple[str, Path | None]]:
        """Every path the merge reads, as ``(what, path)``: the output must avoid them."""
        paths = [("merge config", self.source), ("base model", self.base)]
        paths += [("model", p) for p in self.models]
        paths += [("data file", p) for p in self.model_data]
        return [*paths, ("tokenizer source", self.tokenizer_source)]


def _resolve_path(value: str, folder: Path):
    """A URL as it is; a local path expanded and taken relative to ``folder``."""
    if storage.is_url(value):
        return storage.path(value)
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else folder / path


def _resolver(folder: Path):
    """``_model_path`` for the YAML in ``folder``, as ``resolve(value, where)``."""
    return lambda value, where: _model_path(value, folder, where)


def _model_path(value: Any, folder: Path, where: str) -> Path:
    """A model directory named in the YAML (relative to the YAML's folder)."""
    if isinstance(value, dict):
        raise DemError(f"{where}: structured model references (LoRA, revision) are not supported")
    if not isinstance(value, str) or not value:
        raise DemError(f"{where}: expected a model path, got {value!r}")
    path = _resolve_path(value, folder)
    if not path.exists():
        hint = " (LoRA '+' references are not supported)" if "+" in value else ""
        raise DemError(f"{where}: model path {value!r} does not exist ({path}){hint}")
    return path


def _data_path(method: MergeMethod, value: Any, folder: Path, where: str) -> Path | None:
    """A model's data file: required by data-aware methods, an error on the others."""
    if not method.data:
        if value is not None:
            raise DemError(
                f"{where}: merge_method {method.name} reads no data "
                f"(only {', '.join(DATA_METHODS)} do)"
            )
        return None
    if value is None:
        raise DemError(
            f"{where}: merge_method {method.name} needs a data file per model "
            "(JSONL of the distribution the model was fine-tuned on)"
        )
    if not isinstance(value, str) or not value:
        raise DemError(f"{where}: expected a JSONL file path, got {value!r}")
    path = _resolve_path(value, folder)
    if not path.is_file():
        raise DemError(f"{where}: data file {value!r} does not exist ({path})")
    return path


@dataclass(frozen=True)
class _Body:
    """What a MERGE.yaml merges: its ``models`` or ``slices`` (at the top or in its one
    module), where they were written, and the settings above them, highest first."""

    models: list[ModelEntry] | None
    slices: list[OutputSlice] | None
    prefix: str  # "" at the top, "modules.default." in a module
    scopes: list[tuple[dict[str, Any], str]]  # (settings, where): the module's, the global


def _body(cfg: MergeConfig) -> _Body:
    """The top-level form, or ``modules: {default: ...}`` read as the same merge with the
    module's ``parameters`` between a slice's and the global ones (mergekit's
    ``ConfigReader.parameter_sources``)."""
    scopes = [(dict(cfg.parameters or {}), "parameters")]
    if cfg.modules is None:
        return _Body(cfg.models, cfg.slices, "", scopes)
    module = cfg.modules[DEFAULT_MODULE]
    prefix = f"modules.{DEFAULT_MODULE}."
    if module.models is not None and not module.models:
        raise DemError(f"{prefix}models: expected a non-empty list")
    if module.slices is not None and not module.slices:
        raise DemError(f"{prefix}slices: expected a non-empty list")
    own = (dict(module.parameters or {}), f"{prefix}parameters")
    return _Body(module.models, module.slices, prefix, [own, *scopes])


def _entries(
    body: _Body, cfg: MergeConfig
) -> tuple[list[tuple[ModelEntry, str]], dict[str, Any], Any]:
    """(each input with where it was written, the slice's settings, the base reference)."""
    at = body.prefix
    if body.models is not None:
        return [(m, f"{at}models[{i}]") for i, m in enumerate(body.models)], {}, cfg.base_model
    if len(body.slices) != 1:
        raise DemError(
            f"{at}slices: merge_method {cfg.merge_method} merges whole models: give one "
            "output slice spanning every layer (or models:)"
        )
    (out,) = body.slices
    _warn_residual_weight(out, f"{at}slices[0]")
    entries = [(s, f"{at}slices[0].sources[{i}]") for i, s in enumerate(out.sources)]
    base = out.base_model if out.base_model is not None else cfg.base_model
    return entries, out.parameters or {}, base


def _warn_residual_weight(out: OutputSlice, where: str) -> None:
    if out.residual_weight is not None:
        print(
            f"dem-jax: warning: {where}.residual_weight is ignored, as mergekit 0.1.5 "
            "ignores it (it parses the key and never reads it)",
            file=sys.stderr,
            flush=True,
        )


def _slice(
    out: OutputSlice,
    where: str,
    method: MergeMethod,
    folder: Path,
    default_base: Path | None,
) -> SliceRequest:
    """One output slice checked: paths, equal range lengths, settings, its base."""
    _warn_residual_weight(out, where)
    ref = out.base_model
    base = default_base if ref is None else _model_path(ref, folder, f"{where}.base_model")
    req = SliceRequest([], [], [], [], parameters=dict(out.parameters or {}), where=where)
    for j, src in enumerate(out.sources):
        at = f"{where}.sources[{j}]"
        p = _model_path(src.model, folder, f"{at}.model")
        if p.resolve() in {q.resolve() for q in req.models}:
            raise DemError(f"{at}.model: {src.model!r} is listed twice in {where}")
        _data_path(method, src.data, folder, f"{at}.data")  # an error: no method here reads data
        settings = dict(src.parameters or {})
        if not (method.separate_base and base is not None and p.resolve() == base.resolve()):
            check_parameters(method, settings, f"{at}.parameters", per_model=True)
        lr = tuple(src.layer_range)
        first = req.layer_ranges[0] if req.layer_ranges else lr
        if lr[1] - lr[0] != first[1] - first[0]:
            raise DemError(
                f"{at}.layer_range: {list(lr)} holds {lr[1] - lr[0]} layers but "
                f"{where}.sources[0]'s {list(first)} holds {first[1] - first[0]} (a slice "
                "merges layer k of every source, so every range must hold as many)"
            )
        req.models.append(p)
        req.layer_ranges.append(lr)
        req.model_parameters.append(settings)
        req.wheres.append(at)
    check_parameters(method, req.parameters, f"{where}.parameters", per_model=False)
    if base is None or not method.separate_base:
        return req  # the other methods take a listed base as one more input
    found = [j for j, p in enumerate(req.models) if p.resolve() == base.resolve()]
    if found:
        req.base = found[0]
    elif len(set(req.layer_ranges)) == 1:
        # mergekit requires the base among the sources; an unlisted base is read at
        # the layers the sources share.
        req.models.append(base)
        req.layer_ranges.append(req.layer_ranges[0])
        req.model_parameters.append({})
        req.wheres.append(f"{where}.base_model" if ref is not None else "base_model")
        req.base = len(req.models) - 1
    else:
        raise DemError(
            f"{where}: base model {str(ref or base)!r} is not among its sources, which take "
            "different layer ranges (list it as a source with its layer_range)"
        )
    return req


def parse_merge_config(data: Any, path: str | os.PathLike) -> MergeRequest:
    """Validate a parsed MERGE.yaml mapping into a :class:`MergeRequest`.

    Paths are resolved against ``path``'s folder; every model path must exist.
    Layer ranges are checked against the models later, when their configs are read.
    """
    path = Path(path)
    cfg: MergeConfig = parse_config(MergeConfig, data, path)
    try:
        return _request(cfg, data, path)
    except DemError as e:
        raise DemError(f"{path}: {e}") from None


def _models(cfg: MergeConfig, body: _Body, method: MergeMethod, folder: Path):
    """``models:`` (or a data-aware method's one full slice): (base, paths, per-model
    settings, layer ranges, data files, the settings chain)."""
    entries, slice_params, base_ref = _entries(body, cfg)
    base = _model_path(base_ref, folder, "base_model") if base_ref is not None else None
    paths, params, layer_ranges, model_data = [], [], [], []
    for entry, where in entries:
        p = _model_path(entry.model, folder, f"{where}.model")
        if p.resolve() in {q.resolve() for q in paths}:
            raise DemError(f"{where}.model: {entry.model!r} is listed twice")
        settings = dict(entry.parameters or {})
        is_base = base is not None and p.resolve() == base.resolve()
        if not (is_base and method.separate_base):  # a base's own settings are unused
            check_parameters(method, settings, f"{where}.parameters", per_model=True)
        if method.data:
            check_scalar_settings(method, settings, f"{where}.parameters")
        paths.append(p)
        params.append(settings)
        lr = getattr(entry, "layer_range", None)
        layer_ranges.append(None if lr is None else tuple(lr))
        model_data.append(_data_path(method, entry.data, folder, f"{where}.data"))

    scopes = [(slice_params, f"{body.prefix}slices[0].parameters")] if slice_params else []
    scopes += body.scopes
    chain = [settings for settings, _ in scopes]
    for settings, where in scopes:
        check_parameters(method, settings, where, per_model=False)
        if method.data:
            check_scalar_settings(method, settings, where)

    if base is not None and method.separate_base:
        # A listed base is the base, not an input (its per-model parameters are unused).
        keep = [i for i, p in enumerate(paths) if p.resolve() != base.resolve()]
        paths = [paths[i] for i in keep]
        params = [params[i] for i in keep]
        layer_ranges = [layer_ranges[i] for i in keep]
    elif (
        base is not None
        and method.base == "optional"
        and all(p.resolve() != base.resolve() for p in paths)
    ):
        # linear averages the base like any input; mergekit adds an unlisted base as one.
        paths.append(base)
        params.append({})
        layer_ranges.append(None)

    return base, paths, params, layer_ranges, model_data, chain


def _request(cfg: MergeConfig, data: dict[str, Any], path: Path) -> MergeRequest:
    folder = path.parent
    method = get_method(cfg.merge_method, "merge_method")
    if not method.data:
        for key in DATA_KEYS:
            if key in data:
                raise DemError(
                    f"{key}: merge_method {method.name} reads no data "
                    f"(only {', '.join(DATA_METHODS)} do)"
                )
    body = _body(cfg)
    if body.slices is not None and not method.data:
        base = None if cfg.base_model is None else _model_path(cfg.base_model, folder, "base_model")
        slices = [
            _slice(out, f"{body.prefix}slices[{i}]", method, folder, base)
            for i, out in enumerate(body.slices)
        ]
        for settings, where in body.scopes:
            check_parameters(method, settings, where, per_model=False)
        paths = list({p.resolve(): p for s in slices for p in s.models}.values())
        params, layer_ranges, model_data = [{} for _ in paths], [None] * len(paths), []
        chain = [settings for settings, _ in body.scopes]
    else:
        slices = None
        base, paths, params, layer_ranges, model_data, chain = _models(cfg, body, method, folder)

    tok = cfg.tokenizer_source
    vocabulary = vocabulary_spec(
        tok, cfg.tokenizer, base, [*([base] if base else []), *paths], _resolver(folder)
    )
    if vocabulary is not None and method.data:
        if cfg.tokenizer is not None or tok == "union":
            what = "tokenizer" if cfg.tokenizer is not None else "tokenizer_source: union"
            raise DemError(
                f"{what}: vocabularies are merged for models: and slices: merges, not "
                f"merge_method {method.name}"
            )
        vocabulary = None  # a named tokenizer_source: its files are copied, as before
    # whose tokenizer files the output copies (a re-indexed merge saves its own)
    tok_path = vocabulary.source if vocabulary is not None and tok not in (None, "union") else None
    if vocabulary is None and tok is not None:
        tok_path = base if tok == "base" else _model_path(tok, folder, "tokenizer_source")
        if tok == "base" and base is None:
            raise DemError("tokenizer_source: 'base' needs a base_model")
    # mergekit's "auto" polls every model the YAML names, the base included.
    named = {p.resolve(): p for p in [*([base] if base is not None else []), *paths]}
    return MergeRequest(
        method=method.name,
        base=base,
        models=paths,
        model_parameters=params,
        parameters=chain,
        dtype=cfg.dtype,
        out_dtype=cfg.out_dtype,
        tokenizer_source=tok_path,
        vocabulary=vocabulary,
        chat_template=resolve_chat_template(cfg.chat_template, named.values()),
        seed=cfg.random_seed,
        source=path,
        layer_ranges=layer_ranges,
        slices=slices,
        model_data=model_data,
        data_options=(cfg.data or DataOptions()) if method.data else None,
    )


def _num_layers(path: Path) -> int:
    """Decoder depth of a model or vector directory, from its config alone."""
    # Orbax and vectors import JAX: only for those inputs (see dem_jax.lazy).
    from dem_jax.io.orbax import read_metadata
    from dem_jax.vectors.store import is_vector_dir, vector_config

    if is_vector_dir(path):
        return vector_config(path).num_layers
    if model_format(path) == "orbax":
        return int(read_metadata(path)["model"]["num_layers"])
    return int(storage.read_json(path / HF_CONFIG).get("num_hidden_layers", -1))


def check_layer_ranges(req: MergeRequest) -> None:
    """A slice source must span every layer of its model (no layer stacking)."""
    for path, lr in zip(req.models, req.layer_ranges or [None] * len(req.models), strict=True):
        if lr is None:
            continue
        n = _num_layers(path)
        if tuple(lr) != (0, n):
            raise DemError(
                f"{req.source}: slices: layer_range {list(lr)} for {path} must be [0, {n}] "
                "(partial layer ranges are not supported)"
            )


def load_merge_config(path: str | os.PathLike) -> MergeRequest:
    """Read and validate a mergekit MERGE.yaml file."""
    return parse_merge_config(load_yaml(path), path)
