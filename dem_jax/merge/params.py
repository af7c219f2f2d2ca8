"""mergekit's parameter language, resolved per tensor (mergekit 0.1.5 ``config.py``,
``parameter_resolver.py``).

* Parameters are resolved per output tensor, by its Hugging Face name (a per-model
  one by the name of that model's input tensor, which differs when a slice takes
  other layers), from a chain of settings, highest precedence first: the model's own
  ``parameters`` (per-model parameters only), the slice's ``parameters``, the
  module's (``modules: {default: {parameters}}``), the top-level ``parameters``; the
  first setting that yields a value wins, else the method's default, else the
  parameter is missing (an error).
* A setting is a scalar; a list of scalars (a *gradient*: interpolated linearly
  over the decoder layers, ``t = layer / (num_layers - 1)``, or over the layers of
  an output slice, ``t = k / (n - 1)`` for its k-th of n layers; embeddings, the final
  norm and ``lm_head`` take ``t = 0``; booleans pick the nearest lower entry); or a
  ``{filter: STR, value: SETTING}`` mapping or a list of them, where the first whose
  ``filter`` is a *substring* of the tensor name (or is absent or ``"*"``) applies.

Stricter than mergekit: parameters the method does not take are errors, and a
global-only parameter (``normalize``...) set on one model is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dem_jax.errors import DemError
from dem_jax.lazy import jnp
from dem_jax.merge.method import REQUIRED, MergeMethod, ParamSpec, is_traced_scalar

if TYPE_CHECKING:
    from dem_jax.io.hf.weights import TensorMap

Settings = Mapping[str, Any]
F32 = np.float32


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float) or is_traced_scalar(value)


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
        value = (1 - frac) * values[i0] + frac * values[i1]
        # mergekit validates the interpolated value too: an int must land on a whole number
        return spec.validate(value, tensor_name) if spec.kind is int else value
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
    method: MergeMethod, settings: Mapping[str, Any] | None, where: str, per_model: bool
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


def check_scalar_settings(
    method: MergeMethod, settings: Mapping[str, Any] | None, where: str
) -> None:
    """Data-aware methods take one number per model or per merge: no gradients or filters
    (their statistics merge every tensor at once)."""
    for name, setting in (settings or {}).items():
        if not _is_scalar(setting):
            raise DemError(
                f"{where}.{name}: merge_method {method.name} takes a single number "
                "(no gradients or filters)"
            )


# Continuous parameters that enter the math only as float32 values; the executor
# passes them as jit arguments, so merging again with other weights (a weight
# search) does not recompile. Densities stay static: mergekit counts them in float64.
DYNAMIC = ("weight", "lambda", "t")


@dataclass(frozen=True)
class LeafValues:
    """One leaf's parameters: per-model values (N × L) and shared ones (L), L = layers
    (1 for an unstacked leaf). Hashable when the values are Python scalars."""

    per_model: tuple[tuple[str, tuple[tuple[Any, ...], ...]], ...]
    shared: tuple[tuple[str, tuple[Any, ...]], ...]
    # name -> array overriding the tuples (the executor's traced DYNAMIC values)
    arrays: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    def split(self) -> tuple[LeafValues, dict[str, np.ndarray]]:
        """(the static part, float32 arrays of the DYNAMIC parameters)."""
        dyn = {
            n: np.asarray(v, np.float32) for n, v in (*self.per_model, *self.shared) if n in DYNAMIC
        }
        static = LeafValues(
            tuple((n, v) for n, v in self.per_model if n not in DYNAMIC),
            tuple((n, v) for n, v in self.shared if n not in DYNAMIC),
        )
        return static, dyn

    def model(self, name: str):
        """(N, L) float32-ready array of a per-model parameter (numpy when concrete)."""
        if self.arrays is not None and name in self.arrays:
            return self.arrays[name]
        rows = dict(self.per_model)[name]
        flat = [v for row in rows for v in row]
        if all(isinstance(v, float | int) for v in flat):
            return np.asarray(rows, np.float64)
        return jnp.asarray([[jnp.asarray(v, F32) for v in row] for row in rows], F32)

    def shared_values(self, name: str) -> tuple[Any, ...]:
        """Per-layer values of a shared parameter."""
        return dict(self.shared)[name]

    def shared_array(self, name: str):
        """(L,) array of a shared numeric parameter."""
        if self.arrays is not None and name in self.arrays:
            return self.arrays[name]
        values = self.shared_values(name)
        if all(isinstance(v, float | int) for v in values):
            return np.asarray(values, np.float64)
        return jnp.stack([jnp.asarray(v, F32) for v in values])


def resolve_leaf(
    method: MergeMethod,
    tmap: TensorMap,
    num_layers: int,
    chain: Sequence[Settings | None],
    model_settings: Sequence[Settings | None],
    labels: Sequence[str],
    num_experts: int = 0,
) -> LeafValues:
    """Every parameter of ``method`` for every model and layer of one leaf."""
    from dem_jax.merge.tensor_layout import layer_names_and_ts  # imports the model (JAX)

    names, ts = layer_names_and_ts(tmap, num_layers, num_experts)
    return resolve_values(method, names, ts, chain, model_settings, labels)


def resolve_values(
    method: MergeMethod,
    names: Sequence[str],
    ts: Sequence[float],
    chain: Sequence[Settings | None],
    model_settings: Sequence[Settings | None],
    labels: Sequence[str],
    model_names: Sequence[Sequence[str]] | None = None,
) -> LeafValues:
    """Every parameter of ``method`` for the output tensors ``names`` at gradient
    positions ``ts``. As in mergekit, shared parameters match their filters against
    the output tensor's name and per-model ones against the input tensor's name,
    ``model_names[i]`` for model i (the same names unless a slice takes other layers)."""
    model_names = model_names or [names] * len(model_settings)
    per_model, shared = [], []
    for spec in method.params:
        if spec.per_model:
            rows = tuple(
                tuple(
                    resolve(spec, [settings, *chain], name, t, label)
                    for name, t in zip(own, ts, strict=True)
                )
                for settings, label, own in zip(model_settings, labels, model_names, strict=True)
            )
            per_model.append((spec.name, rows))
        else:
            values = tuple(
                resolve(spec, chain, name, t, "parameters")
                for name, t in zip(names, ts, strict=True)
            )
            shared.append((spec.name, values))
    values = LeafValues(tuple(per_model), tuple(shared))
    method.check_values(values, list(names), list(labels))
    return values


def settings_chain(parameters) -> list[Settings | None]:
    """Global settings as a chain, highest precedence first."""
    if parameters is None:
        return []
    if isinstance(parameters, Mapping):
        return [parameters]
    return list(parameters)
