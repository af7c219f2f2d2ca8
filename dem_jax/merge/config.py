"""mergekit's configuration language: merge methods, their parameters, and MERGE.yaml.

The reference is mergekit 0.1.5 (``mergekit/config.py``, ``parameter_resolver.py``,
``plan.py``, ``merge_methods/registry.py``). What we follow:

* **Parameters** are resolved per output tensor, by its Hugging Face name, from a
  chain of settings, highest precedence first: the model's own ``parameters``
  (per-model parameters only), the slice's ``parameters``, the top-level
  ``parameters``; the first setting that yields a value wins, else the method's
  default, else the parameter is missing (an error).
* A **setting** is a scalar; a list of scalars (a *gradient*: interpolated
  linearly over the decoder layers, ``t = layer / (num_layers - 1)``; embeddings,
  the final norm and ``lm_head`` take ``t = 0``; booleans pick the nearest lower
  entry); or a ``{filter: STR, value: SETTING}`` mapping or a list of them, where the
  first whose ``filter`` is a *substring* of the tensor name (or is absent or
  ``"*"``) applies.
* ``models`` or one output slice whose sources all span every layer
  (``layer_range: [0, num_layers]``); ``base_model``; ``dtype`` (inputs are rounded
  to it before merging); ``out_dtype``; ``tokenizer_source`` (``base`` or a model
  path; its tokenizer files are copied); ``random_seed`` (a dem-jax key that
  mergekit ignores).

What we reject with a DemError (mergekit has it, we do not): ``modules``; several
slices or partial ``layer_range``s (layer stacking); ``residual_weight``; the
``tokenizer`` section, ``tokenizer_source: union`` and ``chat_template``; LoRA
(``model+lora``) and Hub references (model paths must be local HF or dem-jax
directories, relative to the YAML's folder); methods other than those in
:data:`METHODS`. Stricter than mergekit: unknown keys and parameters the method does
not take are errors (mergekit ignores them), ``density``/``gamma``/``t`` must lie in
[0, 1], and a global-only parameter (``normalize``...) set on one model is an error.

Computation differs in one documented way: we always compute in float32 (mergekit
computes in ``dtype``, e.g. bfloat16 arithmetic for ``dtype: bfloat16``).

**Data-aware methods (dem-jax extensions; mergekit has neither).** ``fisher``
(Fisher-weighted averaging, :mod:`dem_jax.fisher`) and ``regmean``
(:mod:`dem_jax.regmean`) merge the listed models using statistics of each model on
its own distribution's data, so they extend the YAML:

* per model, ``data: FILE.jsonl`` (required; relative to the YAML's folder; records
  ``{"text"}`` or ``{"prompt", "completion"}``), next to ``model`` and ``parameters``
  (also in a slice source);
* top-level batching keys (:class:`DataOptions`): ``seq_len`` (512), ``batch_size``
  (8; on a mesh a multiple of data*fsdp), ``max_examples`` (records per file, 0 =
  all), ``prompt_template`` ("{prompt}"), ``add_bos``/``add_eos`` (true);
* parameters, each a single number (no gradients or filters): ``fisher`` takes a
  per-model ``weight`` (≥ 0, default 1; the paper's λ_i) and a global
  ``fisher_floor`` (> 0, default 1e-6: every Fisher is floored at it, as in the
  authors' code); ``regmean`` takes global ``alpha`` (in [0, 1], default 0.9, the
  paper's off-diagonal scale) and ``ridge`` (≥ 0, default 1e-6, relative to the Gram
  diagonal).

``base_model`` is optional and not merged; the tokenizer for the data (and the
output's tokenizer files) comes from ``tokenizer_source``, else ``base_model``, else
the first model. ``data`` or a batching key on any other method is an error, as is
a data-aware method without ``data`` for every model. Inputs must be model
directories (not vectors); they are loaded whole (no streaming). See
:mod:`dem_jax.data_merge`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dem_jax.errors import DemError
from dem_jax.io import storage

REQUIRED = object()  # marks a parameter without a default
# dem_jax.fisher.DEFAULT_FISHER_FLOOR (not imported: parsing a YAML file needs no JAX)
DEFAULT_FISHER_FLOOR = 1e-6


# ------------------------------------------------------------------ methods and parameters


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a merge method takes."""

    name: str
    kind: type  # float or bool
    per_model: bool  # True: one value per input model; False: one for the merge
    default: Any = REQUIRED
    low: float | None = None  # inclusive bounds for floats
    high: float | None = None

    def validate(self, value: Any, where: str) -> Any:
        """The value as this parameter's type, or a DemError naming ``where``."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise DemError(f"{where}: {self.name} must be true or false, got {value!r}")
            return value
        if _is_traced_scalar(value):  # a jax value, e.g. a weight being searched
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DemError(f"{where}: {self.name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise DemError(f"{where}: {self.name} must be finite, got {value!r}")
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            bounds = f"in [{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
            raise DemError(f"{where}: {self.name} must be {bounds}, got {value!r}")
        return value


@dataclass(frozen=True)
class Method:
    """A named merge method: which engine computes it and which parameters it takes."""

    name: str
    kind: str  # "gta", "linear", "slerp", "model_stock" or "parameter_selection"
    params: tuple[ParamSpec, ...]
    sparsify: str | None = None  # dem_jax.merge_methods sparsifier, for kind "gta"
    consensus: str | None = None  # "sum" or None, for kind "gta"
    base: str = "required"  # "required", "optional" (linear: not an input) or "ignored"
    min_models: int = 1  # fine-tuned inputs besides the base
    max_models: int | None = None
    random: bool = False  # draws from the seed
    in_mergekit: bool = True  # False for dem-jax additions
    data: bool = False  # needs a data file per model (statistics of the model on its data)

    def spec(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


def _weight(per_model: bool = True) -> ParamSpec:
    return ParamSpec("weight", float, per_model)


def _gta(name, consensus, sparsify, normalize, rescale, in_mergekit=True) -> Method:
    """A generalized-task-arithmetic method with mergekit 0.1.5's parameters and defaults."""
    params = [
        _weight(),
        ParamSpec("density", float, True, 1.0, 0.0, 1.0),
        ParamSpec("normalize", bool, False, normalize),
        ParamSpec("rescale", bool, False, rescale),
        ParamSpec("lambda", float, False, 1.0),
        ParamSpec("int8_mask", bool, False, False),  # memory only in mergekit: no effect
    ]
    if sparsify == "breadcrumbs":
        params.append(ParamSpec("gamma", float, True, 0.01, 0.0, 1.0))
    if sparsify == "della":
        params.append(ParamSpec("epsilon", float, True, 0.15, 0.0, 1.0))
    # Without a sparsifier (task_arithmetic) mergekit still takes density and rescale;
    # they have no effect.
    return Method(
        name,
        "gta",
        tuple(params),
        sparsify,
        consensus,
        random=sparsify in ("random", "della"),
        in_mergekit=in_mergekit,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _gta("task_arithmetic", None, None, False, False),
        _gta("dem", None, None, False, False, in_mergekit=False),
        _gta("ties", "sum", "magnitude", True, False),
        _gta("dare_ties", "sum", "random", False, True),
        _gta("dare_linear", None, "random", False, True),
        _gta("breadcrumbs", None, "breadcrumbs", False, False),
        _gta("breadcrumbs_ties", "sum", "breadcrumbs", False, False),
        _gta("della", "sum", "della", True, True),
        _gta("della_linear", None, "della", False, True),
        Method(
            "linear",
            "linear",
            (_weight(), ParamSpec("normalize", bool, False, True)),
            base="optional",
        ),
        Method(
            "slerp",
            "slerp",
            (ParamSpec("t", float, False, REQUIRED, 0.0, 1.0),),
            min_models=1,
            max_models=1,
        ),
        Method(
            "model_stock",
            "model_stock",
            (ParamSpec("filter_wise", bool, False, False),),
            min_models=2,
        ),
        Method(
            "parameter_selection",
            "parameter_selection",
            (),
            base="ignored",
            min_models=2,
            random=True,
            in_mergekit=False,
        ),
        # Data-aware merges (dem_jax.fisher, dem_jax.regmean): see "Data-aware methods" above.
        Method(
            "fisher",
            "fisher",
            (
                ParamSpec("weight", float, True, 1.0, 0.0),
                ParamSpec("fisher_floor", float, False, DEFAULT_FISHER_FLOOR, 0.0),
            ),
            base="ignored",
            min_models=2,
            in_mergekit=False,
            data=True,
        ),
        Method(
            "regmean",
            "regmean",
            (
                ParamSpec("alpha", float, False, 0.9, 0.0, 1.0),
                ParamSpec("ridge", float, False, 1e-6, 0.0),
            ),
            base="ignored",
            min_models=2,
            in_mergekit=False,
            data=True,
        ),
    )
}
DATA_METHODS = tuple(name for name, m in METHODS.items() if m.data)


def get_method(name: Any, where: str = "merge_method") -> Method:
    """The method called ``name``, or a DemError listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise DemError(f"{where}: unknown merge method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


# ------------------------------------------------------------------ settings


def _is_traced_scalar(value: Any) -> bool:
    import jax

    return isinstance(value, jax.Array) and value.ndim == 0


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float) or _is_traced_scalar(value)


def check_setting(setting: Any, spec: ParamSpec, where: str) -> None:
    """Validate a setting's structure and every value in it, before any tensor is read."""
    if isinstance(setting, Mapping):
        unknown = sorted(set(setting) - {"filter", "value"})
        if unknown:
            raise DemError(f"{where}: unknown key {unknown[0]!r} (a condition has filter, value)")
        if "value" not in setting:
            raise DemError(f"{where}: a condition needs a 'value'")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise DemError(f"{where}.filter: must be a string, got {setting['filter']!r}")
        check_setting(setting["value"], spec, f"{where}.value")
    elif isinstance(setting, list | tuple):
        if all(_is_scalar(e) for e in setting):
            for i, e in enumerate(setting):
                spec.validate(e, f"{where}[{i}]")
        elif all(isinstance(e, Mapping) for e in setting):
            for i, e in enumerate(setting):
                check_setting(e, spec, f"{where}[{i}]")
        else:
            raise DemError(
                f"{where}: a list must hold only numbers/booleans (a gradient) or only "
                "{filter, value} conditions"
            )
    else:
        spec.validate(setting, where)


def evaluate_setting(setting: Any, tensor_name: str, t: float, spec: ParamSpec) -> Any:
    """mergekit's ``evaluate_setting``: the value for one tensor, or None if no condition
    matches. ``setting`` must have passed :func:`check_setting`."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return spec.validate(setting, spec.name)
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        values = [spec.validate(e, spec.name) for e in setting]
        if spec.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, spec)
    return None


def resolve(
    spec: ParamSpec,
    chain: Sequence[Mapping[str, Any] | None],
    tensor_name: str,
    t: float,
    who: str,
) -> Any:
    """A parameter's value for one tensor from a settings chain (highest precedence
    first), falling back to the default; DemError if required and unset."""
    for scope in chain:
        if scope and spec.name in scope:
            value = evaluate_setting(scope[spec.name], tensor_name, t, spec)
            if value is not None:
                return value
    if spec.default is REQUIRED:
        raise DemError(f"{who}: missing parameter {spec.name} for tensor {tensor_name}")
    return spec.default


def check_parameters(
    method: Method, settings: Mapping[str, Any] | None, where: str, per_model: bool
) -> None:
    """Every name in ``settings`` is a parameter of ``method`` (a per-model one when
    ``per_model``) and every value is well formed."""
    if settings is None:
        return
    if not isinstance(settings, Mapping):
        raise DemError(f"{where}: expected a mapping of parameter names to values")
    for name, setting in settings.items():
        spec = method.spec(name)
        if spec is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise DemError(
                f"{where}.{name}: merge_method {method.name} takes no parameter {name!r} "
                f"(it takes: {known})"
            )
        if per_model and not spec.per_model:
            raise DemError(
                f"{where}.{name}: {name} is one value for the whole merge; set it under "
                "the top-level parameters"
            )
        check_setting(setting, spec, f"{where}.{name}")


# ------------------------------------------------------------------ MERGE.yaml


@dataclass
class MergeRequest:
    """A parsed MERGE.yaml: everything :func:`dem_jax.merge.merge_to_directory` needs."""

    method: str
    base: Path | None
    models: list[Path]
    model_parameters: list[dict[str, Any]]  # one settings mapping per model
    parameters: list[dict[str, Any]] = field(default_factory=list)  # chain, highest first
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Path | None = None  # whose tokenizer files the output gets
    seed: int = 0
    source: Path | None = None  # the YAML file
    # Per model: (start, end) from a slice source, None for `models:`; checked against
    # the model's depth once its config is read.
    layer_ranges: list[tuple[int, int] | None] = field(default_factory=list)
    # Data-aware methods only: one JSONL file per model, and how to batch them.
    model_data: list[Path | None] = field(default_factory=list)
    data_options: DataOptions | None = None


@dataclass(frozen=True)
class DataOptions:
    """How a data-aware method (fisher, regmean) tokenises and batches each model's data
    (top-level MERGE.yaml keys; the same defaults as ``dem-jax score``)."""

    seq_len: int = 512  # tokens per row; one row per document, longer ones split
    batch_size: int = 8  # rows per pass; on a mesh a multiple of data*fsdp
    max_examples: int = 0  # records read from each data file; 0 = all
    prompt_template: str = "{prompt}"  # applied to the prompt of prompt/completion records
    add_bos: bool = True  # prepend the tokenizer's BOS token
    add_eos: bool = True  # append (and count) its EOS token

    @classmethod
    def from_yaml(cls, data: Mapping[str, Any], where: str) -> DataOptions:
        """The options set at the top level of ``data`` (a MERGE.yaml mapping), checked."""
        lows = {"seq_len": 2, "batch_size": 1, "max_examples": 0}
        values: dict[str, Any] = {}
        for name, low in lows.items():
            v = data.get(name, getattr(cls, name))
            if type(v) is not int or v < low:
                raise DemError(f"{where}: {name}: expected an integer >= {low}, got {v!r}")
            values[name] = v
        template = data.get("prompt_template", cls.prompt_template)
        if not isinstance(template, str) or "{prompt}" not in template:
            raise DemError(f"{where}: prompt_template: expected a string with {{prompt}}")
        for name in ("add_bos", "add_eos"):
            v = data.get(name, True)
            if not isinstance(v, bool):
                raise DemError(f"{where}: {name}: expected true or false, got {v!r}")
            values[name] = v
        return cls(prompt_template=template, **values)


# dem-jax keys for data-aware methods (fisher, regmean): see DataOptions.
DATA_KEYS = ("seq_len", "batch_size", "max_examples", "prompt_template", "add_bos", "add_eos")
_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "random_seed",
    *DATA_KEYS,
}
_REJECTED_KEYS = {
    "modules": "modules (per-module merges)",
    "tokenizer": "the tokenizer section (vocabulary surgery)",
    "chat_template": "chat_template",
}
_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in _DTYPES:
        raise DemError(f"{where}: {value!r} is not one of {', '.join(_DTYPES)}")
    return name


def _resolve_path(value: str, folder: Path):
    """A URL as it is; a local path expanded and taken relative to ``folder``."""
    if storage.is_url(value):
        return storage.path(value)
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else folder / path


def _model_path(value: Any, folder: Path, where: str) -> Path:
    """A local model directory named in the YAML (relative to the YAML's folder)."""
    if isinstance(value, Mapping):
        raise DemError(f"{where}: structured model references (LoRA, revision) are not supported")
    if not isinstance(value, str) or not value:
        raise DemError(f"{where}: expected a model path, got {value!r}")
    path = _resolve_path(value, folder)
    if not path.exists():
        hint = " (LoRA '+' references are not supported)" if "+" in value else ""
        raise DemError(f"{where}: model path {value!r} does not exist ({path}){hint}")
    return path


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DemError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _inputs_from_slices(slices: Any, where: str) -> tuple[list[dict[str, Any]], dict, Any]:
    """One full-depth output slice -> (model entries, slice parameters, slice base)."""
    if not isinstance(slices, list) or len(slices) != 1:
        raise DemError(
            f"{where}: only one output slice spanning every layer is supported "
            "(several slices stack layers, which dem-jax does not do)"
        )
    (out,) = slices
    w = f"{where}[0]"
    if not isinstance(out, Mapping):
        raise DemError(f"{w}: expected a mapping")
    unknown = sorted(set(out) - {"sources", "base_model", "parameters", "residual_weight"})
    if unknown:
        raise DemError(f"{w}: unknown key {unknown[0]!r}")
    if out.get("residual_weight") is not None:
        raise DemError(f"{w}.residual_weight: not supported")
    sources = out.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DemError(f"{w}.sources: expected a non-empty list")
    entries = []
    for i, src in enumerate(sources):
        ws = f"{w}.sources[{i}]"
        if not isinstance(src, Mapping):
            raise DemError(f"{ws}: expected a mapping")
        unknown = sorted(set(src) - {"model", "layer_range", "parameters", "data"})
        if unknown:
            raise DemError(f"{ws}: unknown key {unknown[0]!r}")
        lr = src.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr)):
            raise DemError(f"{ws}.layer_range: expected [start, end], got {lr!r}")
        entries.append(
            {
                "model": src.get("model"),
                "parameters": src.get("parameters"),
                "data": src.get("data"),
                "layer_range": tuple(lr),
                "where": ws,
            }
        )
    return entries, _mapping(out.get("parameters"), f"{w}.parameters"), out.get("base_model")


def parse_merge_config(data: Any, path: str | os.PathLike) -> MergeRequest:
    """Validate a MERGE.yaml mapping (already parsed) into a :class:`MergeRequest`.

    Paths are resolved against ``path``'s folder; every model path must exist.
    Layer ranges are checked against the models later, when their configs are read.
    """
    path = Path(path)
    folder = path.parent
    where = str(path)
    if not isinstance(data, Mapping):
        raise DemError(f"{where}: expected a YAML mapping at the top level")
    for key in data:
        if key in _REJECTED_KEYS:
            raise DemError(f"{where}: {key}: {_REJECTED_KEYS[key]} is not supported by dem-jax")
        if key not in _TOP_KEYS:
            raise DemError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    method = get_method(data.get("merge_method"), f"{where}: merge_method")
    if not method.data:
        for key in DATA_KEYS:
            if key in data:
                raise DemError(
                    f"{where}: {key}: merge_method {method.name} reads no data "
                    f"(only {', '.join(DATA_METHODS)} do)"
                )

    if ("models" in data) == ("slices" in data):
        raise DemError(f"{where}: give exactly one of 'models' or 'slices'")
    slice_params: dict[str, Any] = {}
    base_ref = data.get("base_model")
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise DemError(f"{where}: models: expected a non-empty list")
        entries = []
        for i, m in enumerate(models):
            wm = f"{where}: models[{i}]"
            if not isinstance(m, Mapping):
                raise DemError(f"{wm}: expected a mapping with 'model' (and 'parameters')")
            unknown = sorted(set(m) - {"model", "parameters", "data"})
            if unknown:
                raise DemError(f"{wm}: unknown key {unknown[0]!r}")
            entries.append(
                {
                    "model": m.get("model"),
                    "parameters": m.get("parameters"),
                    "data": m.get("data"),
                    "layer_range": None,
                    "where": wm,
                }
            )
    else:
        entries, slice_params, slice_base = _inputs_from_slices(data["slices"], f"{where}: slices")
        base_ref = slice_base if slice_base is not None else base_ref

    base = _model_path(base_ref, folder, f"{where}: base_model") if base_ref is not None else None
    paths: list[Path] = []
    params: list[dict[str, Any]] = []
    layer_ranges: list[Any] = []
    model_data: list[Path | None] = []
    for e in entries:
        p = _model_path(e["model"], folder, f"{e['where']}.model")
        if p.resolve() in {q.resolve() for q in paths}:
            raise DemError(f"{e['where']}.model: {e['model']!r} is listed twice")
        settings = _mapping(e["parameters"], f"{e['where']}.parameters")
        is_base = base is not None and p.resolve() == base.resolve()
        if not (is_base and method.base == "required"):  # a base's own settings are unused
            check_parameters(method, settings, f"{e['where']}.parameters", per_model=True)
        if method.data:
            check_scalar_settings(method, settings, f"{e['where']}.parameters")
        paths.append(p)
        params.append(settings)
        layer_ranges.append(e["layer_range"])
        model_data.append(_data_path(method, e.get("data"), folder, f"{e['where']}.data"))

    global_params = _mapping(data.get("parameters"), f"{where}: parameters")
    chain = [slice_params, global_params] if slice_params else [global_params]
    if slice_params:
        check_parameters(method, slice_params, f"{where}: slices[0].parameters", False)
    check_parameters(method, global_params, f"{where}: parameters", per_model=False)
    if method.data:
        check_scalar_settings(method, global_params, f"{where}: parameters")
        if slice_params:
            check_scalar_settings(method, slice_params, f"{where}: slices[0].parameters")

    if base is not None and method.base == "required":
        # A listed base is the base, not an input (its per-model parameters are unused).
        keep = [i for i, p in enumerate(paths) if p.resolve() != base.resolve()]
        paths = [paths[i] for i in keep]
        params = [params[i] for i in keep]
        layer_ranges = [layer_ranges[i] for i in keep]
    elif (
        base is not None
        and method.kind == "linear"
        and all(p.resolve() != base.resolve() for p in paths)
    ):
        # linear averages the base like any input; mergekit adds an unlisted base as one.
        paths.append(base)
        params.append({})
        layer_ranges.append(None)

    tok = data.get("tokenizer_source")
    if tok == "union":
        raise DemError(f"{where}: tokenizer_source: 'union' (vocabulary merging) is not supported")
    if tok == "base":
        if base is None:
            raise DemError(f"{where}: tokenizer_source: 'base' needs a base_model")
        tok_path = base
    else:
        tok_path = None if tok is None else _model_path(tok, folder, f"{where}: tokenizer_source")
    seed = data.get("random_seed", 0)
    if type(seed) is not int or seed < 0:
        raise DemError(f"{where}: random_seed: expected a non-negative integer, got {seed!r}")
    request = MergeRequest(
        method=method.name,
        base=base,
        models=paths,
        model_parameters=params,
        parameters=chain,
        dtype=_dtype(data.get("dtype"), f"{where}: dtype"),
        out_dtype=_dtype(data.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=tok_path,
        seed=seed,
        source=path,
        layer_ranges=layer_ranges,
        model_data=model_data,
        data_options=DataOptions.from_yaml(data, where) if method.data else None,
    )
    return request


def _data_path(method: Method, value: Any, folder: Path, where: str) -> Path | None:
    """A model's data file (relative to the YAML's folder): required by data-aware
    methods, an error on the others."""
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


def check_scalar_settings(method: Method, settings: Mapping[str, Any] | None, where: str) -> None:
    """Data-aware methods take one number per model or per merge: no gradients or filters
    (their statistics merge every tensor at once)."""
    for name, setting in (settings or {}).items():
        if not _is_scalar(setting):
            raise DemError(
                f"{where}.{name}: merge_method {method.name} takes a single number "
                "(no gradients or filters)"
            )


def _num_layers(path: Path) -> int:
    """Decoder depth of a model or vector directory, from its config alone."""
    # Imported here so that parsing a YAML file needs neither JAX nor Orbax.
    from dem_jax.io.hf.checkpoint import read_json
    from dem_jax.io.modeldir import HF_CONFIG, model_format
    from dem_jax.io.orbax import read_metadata
    from dem_jax.vectors.vector import is_vector_dir, vector_config

    if is_vector_dir(path):
        return vector_config(path).num_layers
    if model_format(path) == "orbax":
        return int(read_metadata(path)["model"]["num_layers"])
    return int(read_json(path / HF_CONFIG).get("num_hidden_layers", -1))


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
    from dem_jax.config.loader import load_yaml

    return parse_merge_config(load_yaml(path), path)
