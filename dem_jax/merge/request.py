"""A MERGE.yaml turned into what a merge needs: checked paths and settings.

The file is read by the run configs' loader into :class:`~dem_jax.config.merge.MergeConfig`
(mergekit 0.1.5's ``mergekit/config.py`` format). What we follow: ``models`` or one
output slice whose sources all span every layer (``layer_range: [0, num_layers]``);
``base_model``; ``parameters`` at the top, per slice and per model (resolved by
:mod:`dem_jax.merge.params`); ``dtype`` (inputs are rounded to it before merging);
``out_dtype``; ``tokenizer_source`` (``base`` or a model path; its tokenizer files
are copied); ``chat_template`` (``auto``, a template mergekit ships, or a Jinja
template: :mod:`dem_jax.merge.chat_template`); ``random_seed`` (a dem-jax key that
mergekit ignores).

Refused with a DemError (mergekit has it, we do not): ``modules``; several slices or
partial ``layer_range``s (layer stacking); ``residual_weight``; the ``tokenizer``
section and ``tokenizer_source: union``; LoRA (``model+lora``) and
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dem_jax.config.loader import load_yaml, parse_config
from dem_jax.config.merge import DataOptions, MergeConfig, ModelEntry
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import HF_CONFIG, model_format
from dem_jax.io.orbax import read_metadata
from dem_jax.merge.chat_template import resolve_chat_template
from dem_jax.merge.method import MergeMethod
from dem_jax.merge.params import check_parameters, check_scalar_settings
from dem_jax.merge.registry import DATA_METHODS, get_method
from dem_jax.vectors.store import is_vector_dir, vector_config

DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataOptions))


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
    chat_template: str | None = None  # the template the output's tokenizer gets (the text)
    seed: int = 0
    source: Path | None = None  # the YAML file
    # Per model: (start, end) from a slice source, None for `models:`; checked against
    # the model's depth once its config is read.
    layer_ranges: list[tuple[int, int] | None] = field(default_factory=list)
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


def _entries(cfg: MergeConfig) -> tuple[list[tuple[ModelEntry, str]], dict[str, Any], Any]:
    """(each input with where it was written, the slice's settings, the base reference)."""
    if cfg.models is not None:
        return [(m, f"models[{i}]") for i, m in enumerate(cfg.models)], {}, cfg.base_model
    if len(cfg.slices) != 1:
        raise DemError(
            "slices: only one output slice spanning every layer is supported "
            "(several slices stack layers, which dem-jax does not do)"
        )
    (out,) = cfg.slices
    entries = [(s, f"slices[0].sources[{i}]") for i, s in enumerate(out.sources)]
    base = out.base_model if out.base_model is not None else cfg.base_model
    return entries, out.parameters or {}, base


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
    entries, slice_params, base_ref = _entries(cfg)
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

    global_params = dict(cfg.parameters or {})
    chain = [slice_params, global_params] if slice_params else [global_params]
    scopes = [(slice_params, "slices[0].parameters")] if slice_params else []
    for settings, where in [*scopes, (global_params, "parameters")]:
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

    tok = cfg.tokenizer_source
    if tok == "base":
        if base is None:
            raise DemError("tokenizer_source: 'base' needs a base_model")
        tok_path = base
    else:
        tok_path = None if tok is None else _model_path(tok, folder, "tokenizer_source")
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
        chat_template=resolve_chat_template(cfg.chat_template, named.values()),
        seed=cfg.random_seed,
        source=path,
        layer_ranges=layer_ranges,
        model_data=model_data,
        data_options=(cfg.data or DataOptions()) if method.data else None,
    )


def _num_layers(path: Path) -> int:
    """Decoder depth of a model or vector directory, from its config alone."""
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
