"""The MERGE.yaml schema (mergekit's configuration format), as typed dataclasses read
by the same loader as run configs (:mod:`dem_jax.config.loader`).

mergekit 0.1.5 reference: ``mergekit/config.py`` (``MergeConfiguration``,
``InputModelDefinition``, ``OutputSliceDefinition``, ``InputSliceDefinition``).
What each key means, and which are refused, is in :mod:`dem_jax.merge.request`,
which turns a :class:`MergeConfig` into paths and settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dem_jax.config.model import DTYPES
from dem_jax.config.run import check_prompt_template
from dem_jax.errors import DemError


@dataclass(frozen=True)
class DataOptions:
    """How a data-aware method (fisher, regmean) tokenises and batches each model's data
    (top-level MERGE.yaml keys; the same defaults as ``dem-jax score``)."""

    seq_len: int = 512  # tokens per row; one row per document, longer ones split
    batch_size: int = 8  # rows per pass; on a mesh a multiple of data*fsdp*expert
    max_examples: int = 0  # records read from each data file; 0 = all
    prompt_template: str = "{prompt}"  # applied to the prompt of prompt/completion records
    add_bos: bool = True  # prepend the tokenizer's BOS token
    add_eos: bool = True  # append (and count) its EOS token

    def __post_init__(self):
        for name, low in (("seq_len", 2), ("batch_size", 1), ("max_examples", 0)):
            if getattr(self, name) < low:
                raise DemError(f"{name}: expected an integer >= {low}, got {getattr(self, name)!r}")
        if "{prompt}" not in self.prompt_template:
            raise DemError("prompt_template: expected a string with {prompt}")
        check_prompt_template(self.prompt_template, "prompt_template")


@dataclass
class ModelEntry:
    """One entry of ``models:``."""

    model: Any = None  # a local or gs:// model directory, relative to the YAML's folder
    parameters: dict[str, Any] | None = None  # per-model settings (weight, density...)
    data: Any = None  # fisher/regmean: JSONL of the distribution the model was tuned on


@dataclass
class SliceSource(ModelEntry):
    """One source of an output slice: a model and the layers taken from it."""

    layer_range: list[int] | None = None  # [start, end): layers start .. end - 1

    def __post_init__(self):
        lr = self.layer_range
        if lr is None or len(lr) != 2 or not 0 <= lr[0] < lr[1]:
            raise DemError(
                f"layer_range: expected [start, end] with 0 <= start < end (layers start "
                f"to end - 1), got {lr!r}"
            )


@dataclass
class OutputSlice:
    """One entry of ``slices:``: output layers merged from its sources' layer ranges."""

    sources: list[SliceSource] | None = None
    base_model: Any = None
    parameters: dict[str, Any] | None = None
    # mergekit 0.1.5 parses residual_weight and never reads it: accepted, and ignored
    # with a warning (request.py), so a mergekit YAML merges to mergekit's tensors.
    residual_weight: float | None = None

    def __post_init__(self):
        if not self.sources:
            raise DemError("sources: expected a non-empty list")


# mergekit names the one module of a single-module architecture "default"; every
# family dem-jax supports has one module (multi-modal models have several).
DEFAULT_MODULE = "default"


@dataclass
class OutputModule:
    """One entry of ``modules:`` (mergekit's ``OutputModuleDefinition``): a merge of one
    module of the architecture, by ``models`` or ``slices``, with its own settings
    (below a slice's and above the top-level ones)."""

    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] | None = None

    def __post_init__(self):
        if (self.models is None) == (self.slices is None):
            raise DemError("give exactly one of 'models' or 'slices'")


@dataclass
class MergeConfig:
    """A whole MERGE.yaml."""

    merge_method: Any = None  # a name from dem_jax.merge.registry
    base_model: Any = None
    models: list[ModelEntry] | None = None  # give models or slices, not both
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] | None = None  # global settings
    dtype: str | None = None  # inputs are rounded to it before merging
    out_dtype: str | None = None  # default: dtype, else the inputs' promoted dtype
    tokenizer_source: str | None = None  # "union", "base" or a model path (merge/vocab.py)
    random_seed: int = 0  # dem-jax: seed of the random methods (mergekit ignores it)
    # dem-jax, fisher/regmean only: batching keys at the top level.
    data: DataOptions | None = field(default=None, metadata={"inline": True})
    # mergekit's per-module form; dem-jax's families have one module, "default", so
    # `modules: {default: {...}}` is the same merge as its models/slices at the top.
    modules: dict[str, OutputModule] | None = None
    tokenizer: dict[str, Any] | None = None  # source, tokens, pad_to_multiple_of (merge/vocab.py)
    chat_template: str | None = None  # "auto", a template mergekit ships, or a Jinja template

    def __post_init__(self):
        for name in ("dtype", "out_dtype"):
            value = getattr(self, name)
            if value is not None:
                value = value.removeprefix("torch.")
                if value not in DTYPES:
                    raise DemError(
                        f"{name}: {getattr(self, name)!r} is not one of {', '.join(DTYPES)}"
                    )
                setattr(self, name, value)
        if self.random_seed < 0:
            raise DemError(
                f"random_seed: expected a non-negative integer, got {self.random_seed!r}"
            )
        given = [k for k in ("models", "slices", "modules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise DemError("give exactly one of 'models', 'slices' or 'modules'")
        if self.modules is not None:
            names = list(self.modules)
            if names != [DEFAULT_MODULE]:
                raise DemError(
                    f"modules: dem-jax's model families have one module, "
                    f"{DEFAULT_MODULE!r} (as mergekit names it); got {names}"
                )
        if self.models is not None and not self.models:
            raise DemError("models: expected a non-empty list")
