"""Merges over output slices (mergekit's ``slices:``): layer stacking and slice merges.

    plan = SlicePlan("passthrough", [
        MergeSlice((LayerSource("a/", (0, 2)),)),
        MergeSlice((LayerSource("b/", (1, 3)),)),
    ])  # a's layers 0-1, then b's layers 1-2: a 4-layer model

The output's layers are its slices' layers, in order. Each slice merges its sources'
layer ranges (all of one length) with the method, layer by layer: output layer
``offset + k`` is the merge of layer ``start_i + k`` of every source i (mergekit 0.1.5
``plan.py::MergePlanner.plan_slice``). As in mergekit:

* a gradient (a list-valued parameter) runs over each slice's own layers,
  ``t = k / (n - 1)`` (1 for a one-layer slice);
* shared parameters match their filters against the output tensor's name, per-model
  ones against the input tensor's (``model.layers.{start_i + k}...``);
* the embeddings are merged over the first slice's sources, the final norm and
  ``lm_head`` over the last slice's (only as many of them as the first slice has),
  each with that slice's parameters and base, at ``t = 0``;
* the output's config is the reference model's (the top-level base model, else the
  first slice's first source) with the new ``num_hidden_layers``.

Beyond mergekit: each output layer keeps the attention of the layer it came from
(the slice's base, else its first source), written as ``layer_types`` and window keys
in ``config.json`` (:func:`dem_jax.io.hf.config.with_layers`), so the output loads in
transformers with every layer attending as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dem_jax.errors import DemError
from dem_jax.io.hf.config import to_hf_config, with_layers
from dem_jax.io.hf.weights import TensorMap, tensor_maps
from dem_jax.io.modeldir import Model
from dem_jax.io.tree import get_leaf
from dem_jax.merge.engine import MergePlan, check_input_count, engine_method, run_leaf
from dem_jax.merge.noise import leaf_key
from dem_jax.merge.params import (
    LeafValues,
    Settings,
    check_parameters,
    resolve_values,
    settings_chain,
)
from dem_jax.merge.slice_rules import final_inputs, slices_of
from dem_jax.merge.sources import Source, open_source
from dem_jax.merge.tensor_layout import layer_names_and_ts
from dem_jax.vectors.vector import Vector, check_compatible


@dataclass(frozen=True)
class LayerSource:
    """One source of an output slice: a model (or vector, or directory), the layers
    ``[start, end)`` taken from it and its per-model settings."""

    source: Model | Vector | str | os.PathLike
    layer_range: tuple[int, int]
    parameters: Settings | None = None
    name: str | None = None  # the model's name in provenance; default its path
    where: str | None = None  # where it was written, for messages ("slices[1].sources[0]")


@dataclass(frozen=True)
class MergeSlice:
    """One output slice: its sources in order, which of them is the base (methods with a
    separate base; None: every source is an input) and the slice's settings."""

    sources: tuple[LayerSource, ...]
    base: int | None = None
    parameters: Settings | None = None
    name: str = "slice"


@dataclass(frozen=True)
class _Group:
    """One slice as the executor sees it: opened sources and checked settings."""

    base: Source | None
    base_range: tuple[int, int] | None
    inputs: tuple[Source, ...]
    ranges: tuple[tuple[int, int], ...]
    settings: tuple[Settings | None, ...]
    labels: tuple[str, ...]
    chain: tuple[Settings | None, ...]

    @property
    def length(self) -> int:
        return self.ranges[0][1] - self.ranges[0][0]


def _key(item) -> Any:
    """Sources are opened once per model, however many slices read it."""
    if isinstance(item, str | os.PathLike):
        return ("path", os.path.realpath(os.fspath(item)))
    return ("object", id(item))


def _label(src: LayerSource) -> str:
    if src.name is not None:
        return src.name
    return str(src.source) if isinstance(src.source, str | os.PathLike) else "model"


def _where(src: LayerSource) -> str:
    return src.where or _label(src)


class SlicePlan(MergePlan):
    """A checked merge of output slices, ready to produce its leaves (as
    :class:`~dem_jax.merge.engine.MergePlan`, whose writers and ``to_model`` it shares)."""

    def __init__(
        self,
        method: str,
        slices: Sequence[MergeSlice],
        *,
        base=None,
        parameters=None,
        seed: int = 0,
        mesh: Mesh | None = None,
        dtype: str | None = None,
        out_dtype: str | None = None,
        streaming: bool = False,
        tokenizer_source=None,
        allow_crimes: bool | None = None,
    ):
        self.method = m = engine_method(method)
        self.allow_crimes = allow_crimes
        if not slices:
            raise DemError("slices: expected at least one output slice")
        self.chain = settings_chain(parameters)
        for settings in self.chain:
            check_parameters(m, settings, "parameters", per_model=False)
        self.slices = list(slices)
        self.sources: list[Source] = []
        self._opened: dict[Any, Source] = {}
        try:
            self.base = None if base is None else self._open(base, str(base), mesh, streaming)
            self.groups = [self._group(s, mesh, streaming) for s in self.slices]
            self._check(mesh, dtype, out_dtype, seed, tokenizer_source)
        except BaseException:
            self.close()
            raise

    def _open(self, item, label: str, mesh, streaming: bool) -> Source:
        key = _key(item)
        if key not in self._opened:
            self._opened[key] = open_source(item, label, mesh, streaming)
            self.sources.append(self._opened[key])
        return self._opened[key]

    def _group(self, s: MergeSlice, mesh, streaming: bool) -> _Group:
        m = self.method
        if not s.sources:
            raise DemError(f"{s.name}.sources: expected a non-empty list")
        if s.base is not None and not (0 <= s.base < len(s.sources)):
            raise DemError(f"{s.name}: base index {s.base} is not one of its sources")
        check_parameters(m, s.parameters, f"{s.name}.parameters", per_model=False)
        opened, lengths = [], set()
        for src in s.sources:
            start, end = src.layer_range
            if not 0 <= start < end:
                raise DemError(
                    f"{_where(src)}.layer_range: expected [start, end) with 0 <= start < end, "
                    f"got {list(src.layer_range)}"
                )
            lengths.add(end - start)
            opened.append(self._open(src.source, _label(src), mesh, streaming))
            n = opened[-1].config.num_layers
            if end > n:
                raise DemError(
                    f"{_where(src)}.layer_range: [{start}, {end}] lies outside {_label(src)} "
                    f"({n} layers: [0, {n}] at most)"
                )
        if len(lengths) > 1:
            counts = ", ".join(str(e - b) for b, e in (x.layer_range for x in s.sources))
            raise DemError(
                f"{s.name}.sources: their layer ranges hold different numbers of layers "
                f"({counts}); a slice merges layer k of every source, so they must be equal"
            )
        keep = [i for i in range(len(s.sources)) if i != s.base]
        labels = tuple(_label(s.sources[i]) for i in keep)
        for i in keep:
            where = f"{_where(s.sources[i])}.parameters"
            check_parameters(m, s.sources[i].parameters, where, per_model=True)
        base = None if s.base is None else opened[s.base]
        check_input_count(m, len(keep), base is not None, f"{s.name}: ")
        for i in keep:
            if opened[i].is_vector and base is None:
                raise DemError(f"{_where(s.sources[i])}: a vector input needs a base model")
        if base is not None and base.is_vector:
            raise DemError(f"{_where(s.sources[s.base])}: the base must be a model, not a vector")
        return _Group(
            base=base,
            base_range=None if s.base is None else tuple(s.sources[s.base].layer_range),
            inputs=tuple(opened[i] for i in keep),
            ranges=tuple(tuple(s.sources[i].layer_range) for i in keep),
            settings=tuple(s.sources[i].parameters for i in keep),
            labels=labels,
            chain=(s.parameters, *self.chain),
        )

    def _check(self, mesh, dtype, out_dtype, seed, tokenizer_source):
        ref = self.sources[0]  # the top-level base, else the first slice's first source
        for src in self.sources:  # depths may differ; everything else must agree
            other = ref.config.replace(
                num_layers=src.config.num_layers, sliding_windows=src.config.sliding_windows
            )
            check_compatible(other, src.config, ref.label, src.label, self.allow_crimes)
        windows = []
        for g in self.groups:
            src, (start, _) = (g.base, g.base_range) if g.base else (g.inputs[0], g.ranges[0])
            own = src.config.sliding_windows or (None,) * src.config.num_layers
            windows += own[start : start + g.length]
        sizes = sorted({w for w in windows if w is not None})
        if len(sizes) > 1:
            raise DemError(
                f"slices: the layers taken attend through sliding windows of different "
                f"sizes ({', '.join(map(str, sizes))}); a config.json holds one"
            )
        self.config = ref.config.replace(num_layers=len(windows), sliding_windows=tuple(windows))
        self._settle(mesh, dtype, out_dtype, seed, tokenizer_source, self.sources)
        if self.hf_config is not None:
            self.hf_config = with_layers(self.hf_config, self.config)
            to_hf_config(self.output_config(), self.hf_config)  # fails now, not after merging
        self.labels = list(dict.fromkeys(s.label for s in self.sources if s is not self.base))
        # Every parameter of every leaf resolved up front: bad settings fail before any read.
        self.values = {
            (tmap.path, i): self._resolve(tmap, i, g)
            for tmap in tensor_maps(self.config)
            for i, g in self._groups_of(tmap)
        }

    def _groups_of(self, tmap: TensorMap) -> list[tuple[int, _Group]]:
        """Which slices merge a leaf (:func:`dem_jax.merge.slice_rules.slices_of`); the
        final norm and lm_head only the last slice's first inputs (``final_inputs``)."""
        index = slices_of(tmap, len(self.groups))
        if tmap.stacked or tmap.path[0] == "embed":
            return [(i, self.groups[i]) for i in index]
        s, last = self.slices[-1], self.groups[-1]
        n = final_inputs(len(self.slices[0].sources), len(s.sources), s.base, s.name)
        group = _Group(
            last.base,
            last.base_range,
            last.inputs[:n],
            last.ranges[:n],
            last.settings[:n],
            last.labels[:n],
            last.chain,
        )
        check_input_count(self.method, n, group.base is not None, f"{s.name}: ")
        return [(len(self.groups) - 1, group)]

    def _offset(self, index: int) -> int:
        return sum(g.length for g in self.groups[:index])

    def _resolve(self, tmap: TensorMap, index: int, g: _Group) -> LeafValues:
        experts = self.config.num_experts
        n = g.length if tmap.stacked else 1
        names, ts = layer_names_and_ts(tmap, n, experts, self._offset(index))
        own = [layer_names_and_ts(tmap, n, experts, start)[0] for start, _ in g.ranges]
        return resolve_values(self.method, names, ts, g.chain, g.settings, g.labels, own)

    def leaves(self) -> Iterator[tuple[TensorMap, jax.Array]]:
        """(key-map entry, merged leaf) for every parameter, in export order: a stacked
        leaf is its slices' merges, concatenated along the layers."""
        for tmap in tensor_maps(self.config):
            sharding = get_leaf(self.shardings, tmap.path)
            parts = [self._merge(tmap, i, g, sharding) for i, g in self._groups_of(tmap)]
            leaf = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
            yield tmap, leaf if len(parts) == 1 else jax.device_put(leaf, sharding)
            del parts, leaf

    def _merge(self, tmap: TensorMap, index: int, g: _Group, sharding) -> jax.Array:
        base = None if g.base is None else g.base.read(tmap, sharding, g.base_range)
        inputs = [s.read(tmap, sharding, r) for s, r in zip(g.inputs, g.ranges, strict=True)]
        key = None
        if self.method.random:  # one stream per slice; the first slice's as a plain merge's
            key = leaf_key(self.seed, tmap)
            key = jax.random.fold_in(key, index) if index else key
        return run_leaf(
            self.method,
            tmap,
            base,
            inputs,
            tuple(s.is_vector for s in g.inputs),
            self.values[(tmap.path, index)],
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            sharding=sharding,
            key=key,
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-able provenance stored with the output (the slices as labels and ranges)."""
        out = super().metadata()
        out["merge"]["slices"] = [
            [{"model": _label(src), "layer_range": list(src.layer_range)} for src in s.sources]
            for s in self.slices
        ]
        return out


def merge_slices(method: str, slices: Sequence[MergeSlice], **options) -> Model:
    """Merge output ``slices`` with ``method`` into one model on the mesh (options as
    :func:`dem_jax.merge.engine.merge`, plus ``base``: whose config the output takes)."""
    run = SlicePlan(method, slices, **options)
    try:
        return run.to_model()
    finally:
        run.close()
