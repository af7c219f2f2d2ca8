"""What a merge method is: its parameters (with their defaults) and its kernel.

Every method is one object, declared in its own module of :mod:`dem_jax.merge.methods`
next to its math; :mod:`dem_jax.merge.registry` collects them. A method object says

* which parameters it takes (:class:`ParamSpec`: type, per model or per merge,
  default, bounds) — the only place a method's defaults are written down;
* how many inputs it takes and what it does with the base model;
* its kernel: one leaf of every input in, one merged leaf out (:meth:`MergeMethod.kernel`).

The engine (:mod:`dem_jax.merge.engine`) resolves the parameters per layer, reads the
inputs and calls the kernel; a kernel is pure ``jax.numpy`` and is traced under
``jax.jit`` once per leaf shape and setting.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dem_jax.errors import DemError, did_you_mean

if TYPE_CHECKING:
    import jax

REQUIRED = object()  # marks a parameter without a default


def is_traced_scalar(value: Any) -> bool:
    """A 0-d jax array (e.g. a weight being searched under ``jax.jit``)."""
    jax = sys.modules.get("jax")  # none without JAX imported (the host executor)
    return jax is not None and isinstance(value, jax.Array) and value.ndim == 0


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a merge method takes."""

    name: str
    kind: type  # float, int or bool
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
        if is_traced_scalar(value):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DemError(f"{where}: {self.name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise DemError(f"{where}: {self.name} must be finite, got {value!r}")
        if self.kind is int:
            if not value.is_integer():
                raise DemError(f"{where}: {self.name} must be a whole number, got {value!r}")
            value = int(value)
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            bounds = f"in [{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
            raise DemError(f"{where}: {self.name} must be {bounds}, got {value!r}")
        return value


def weight(default: Any = REQUIRED, low: float | None = None) -> ParamSpec:
    """The per-model ``weight`` most methods take."""
    return ParamSpec("weight", float, True, default, low)


@dataclass(frozen=True)
class Leaf:
    """What a kernel sees of one parameter leaf (layers first: ``L`` = layers, 1 for
    an unstacked leaf; ``N`` = inputs besides the base)."""

    layout: Any  # dem_jax.merge.tensor_layout.Layout: how a layer maps onto its HF tensor
    base: jax.Array | None  # (L, *s) float32; None when the method's base is not given
    inputs: jax.Array  # (L, N, *s) float32: models, or for delta methods vectors as given
    is_vector: tuple[bool, ...]  # which inputs are distribution vectors
    values: Any  # dem_jax.merge.params.LeafValues: every parameter per model and layer
    noise: jax.Array | None  # (K, *s) uniforms for random methods (see noise_count)


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    """A named merge method over models (or distribution vectors) of one architecture."""

    name: str
    params: tuple[ParamSpec, ...] = ()
    # "required"; "if_given" (the base when one is given, else none); "optional" (an
    # input like the others); "ignored"
    base: str = "required"
    min_models: int = 1  # inputs besides the base ("optional": the base included)
    max_models: int | None = None
    random: bool = False  # draws uniforms from the merge seed
    in_mergekit: bool = True  # False for dem-jax additions
    data: bool = False  # needs a data file per model (see DataMergeMethod)
    # Works on task vectors Θ_i − Θ (a vector input is used as it is); otherwise on
    # the models themselves (a vector input becomes Θ + ΔΘ_i).
    on_deltas: bool = False
    # Boolean parameters that change the kernel's program: a leaf whose layers set
    # them differently is merged once per setting.
    static_flags: tuple[str, ...] = ()

    @property
    def separate_base(self) -> bool:
        """A given base model is the base, not one more input (and its per-model
        parameters are unused)."""
        return self.base in ("required", "if_given")

    def spec(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)

    def defaults(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's value: ``settings`` over the defaults (for tensor-level use)."""
        unknown = sorted(set(settings) - {p.name for p in self.params})
        if unknown:
            hint = did_you_mean(unknown[0], [p.name for p in self.params])
            raise DemError(
                f"merge_method {self.name} takes no parameter {unknown[0]!r}"
                + (f" ({hint.strip()})" if hint else "")
            )
        values = {}
        for p in self.params:
            value = settings.get(p.name, p.default)
            if value is REQUIRED:
                raise DemError(f"merge_method {self.name}: missing parameter {p.name}")
            values[p.name] = value
        return values

    def noise_count(self, n_models: int, n_layers: int) -> int:
        """How many uniforms a random method draws per element of one layer's tensor."""
        return n_models * n_layers

    def check_values(self, values: Any, tensor_names: list[str], labels: list[str]) -> None:
        """Reject parameter values the method cannot use (before any tensor is read)."""

    def kernel(self, leaf: Leaf, flags: Mapping[str, Any]) -> jax.Array:
        """The merged leaf, (L, *s) float32; ``flags`` holds the static_flags' values."""
        raise NotImplementedError(f"merge_method {self.name} has no leaf kernel")


@dataclass(frozen=True, kw_only=True)
class DataMergeMethod(MergeMethod):
    """A merge that needs each model's statistics on its own data (whole models, not
    leaf by leaf): every parameter is one number per model or per merge."""

    base: str = "ignored"
    min_models: int = 2
    in_mergekit: bool = False
    data: bool = True

    def check_scalars(self, per_model: list[dict[str, Any]], shared: dict[str, Any]) -> None:
        """Reject values the method cannot use, once every parameter is resolved."""

    def merge_models(self, params_list, config, batches, mesh, per_model, shared) -> Any:
        """float32 merge of ``params_list`` (on ``mesh``), model i's statistics taken on
        ``batches[i]``; ``per_model`` / ``shared`` are the resolved parameters."""
        raise NotImplementedError


def check_input_count(m: MergeMethod, n: int, has_base: bool, where: str = "") -> None:
    """DemError unless ``m`` takes ``n`` inputs (besides the base) and a base is given
    where it needs one; ``where`` (e.g. ``slices[1]: ``) starts the message."""
    if m.base == "required" and not has_base:
        raise DemError(f"{where}merge_method {m.name} needs a base model")
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        want = m.min_models if m.max_models == m.min_models else f"at least {m.min_models}"
        if m.max_models is not None and n > m.max_models:
            want = m.max_models if m.max_models == m.min_models else f"at most {m.max_models}"
        which = {"optional": " counting the base model", "ignored": ""}.get(
            m.base, " besides the base"
        )
        raise DemError(f"{where}merge_method {m.name} needs {want} model(s){which}, got {n}")
