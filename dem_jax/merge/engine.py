"""The merge engine: a merge method over whole models, one parameter leaf at a time.

    merged = merge("dem", base, [MergeInput(v, {"weight": 0.7}) for v in vectors])

Every parameter (a *leaf*, with all decoder layers stacked on its leading axis)
is merged by one jitted call of its method's kernel
(:mod:`dem_jax.merge.methods`) with the leaf's own sharding, so a merge runs on a
device mesh without gathering a model on one host. What a whole model adds:

* **Per-tensor semantics.** mergekit merges each Hugging Face tensor on its own,
  and one HF tensor is one layer of one of our leaves, so every whole-tensor
  statistic (top-k counts, L1 rescaling, SLERP angles, Model Stock cosines) is
  taken per layer, and each parameter is resolved per layer from its HF name
  (:mod:`dem_jax.merge.params`, :mod:`dem_jax.merge.tensor_layout`).
* **Seeds.** Random methods draw mesh-independent uniforms (:mod:`dem_jax.merge.noise`).
* **Precision.** Inputs are rounded to ``dtype`` when given (as mergekit loads
  them), then merged in float32; the result is cast to the output dtype.
* **Two executors, one kernel.** In memory (every input loaded) or streaming (each
  input leaf read from its checkpoint when needed, :mod:`dem_jax.merge.sources`), so
  peak memory is the output plus a few copies of one leaf per input; both call
  the same jitted function and agree bit for bit. Writing outputs is
  :mod:`dem_jax.merge.output`.

Inputs are models (Θ_i) or distribution vectors (ΔΘ_i, :mod:`dem_jax.vectors`);
task-vector methods use a vector as it is, the others use Θ + ΔΘ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.weights import TensorMap, tensor_maps
from dem_jax.io.modeldir import Model
from dem_jax.io.tree import get_leaf, set_leaf
from dem_jax.merge.arrays import F32
from dem_jax.merge.method import Leaf, MergeMethod, check_input_count
from dem_jax.merge.noise import draw_uniform, leaf_key, noise_shape
from dem_jax.merge.params import (
    LeafValues,
    Settings,
    check_parameters,
    resolve_leaf,
    settings_chain,
)
from dem_jax.merge.registry import get_method
from dem_jax.merge.sources import Source, open_source
from dem_jax.merge.tensor_layout import Layout
from dem_jax.sharding.rules import param_shardings
from dem_jax.vectors.vector import Vector, check_compatible


@dataclass(frozen=True)
class MergeInput:
    """One fine-tuned input: a model or vector (in memory or a directory) and its
    per-model parameter settings (``weight``, ``density``, ...; mergekit syntax)."""

    source: Model | Vector | str | os.PathLike
    parameters: Settings | None = None
    name: str | None = None  # for messages; defaults to the path


def merge_leaf(
    method: MergeMethod,
    layout: Layout,
    base,
    inputs: Sequence,
    is_vector: Sequence[bool],
    values: LeafValues,
    key=None,
    dtype: str | None = None,
    noise=None,
) -> jax.Array:
    """Merge one leaf (pure, jittable): float32 result shaped like ``base``.

    ``inputs`` are the models' (or vectors') leaves, ``values`` the resolved
    parameters (:func:`resolve_leaf`). A stacked leaf is merged as one tensor per
    layer. Boolean parameters that differ between layers are honoured by merging
    once per distinct setting and selecting per layer. Random methods draw
    ``jax.random.uniform(key, noise_shape(...))`` unless given that ``noise``.
    """

    def prep(x, vector: bool):
        x = jnp.asarray(x)
        if dtype is not None and not vector:
            x = x.astype(dtype)  # mergekit rounds its inputs to `dtype` when loading
        x = x.astype(F32)
        # one row per HF tensor (per layer, and per expert of a mixture of experts)
        return x.reshape(-1, *x.shape[layout.depth :]) if layout.stacked else x[None]

    b = None if base is None else prep(base, False)
    xs = [prep(x, v) for x, v in zip(inputs, is_vector, strict=True)]
    if not method.on_deltas:  # these methods work on models: Θ_i = Θ + ΔΘ_i
        xs = [x + b if v else x for x, v in zip(xs, is_vector, strict=True)]
    xs = jnp.stack(xs, axis=1)  # (L, N, *s)
    if method.random:
        shape = noise_shape(method, len(inputs), xs.shape[2:], xs.shape[0])
        noise = jax.random.uniform(key, shape) if noise is None else noise.reshape(shape)
        noise = jnp.moveaxis(noise, -1, 0)  # (K, *layer_shape)

    names = method.static_flags
    per_layer = [tuple(values.shared_values(n)[i] for n in names) for i in range(xs.shape[0])]
    out = None
    for combo in dict.fromkeys(per_layer):
        flags = dict(zip(names, combo, strict=True))
        res = method.kernel(Leaf(layout, b, xs, tuple(is_vector), values, noise), flags)
        if out is None:
            out = res
        else:
            pick = np.asarray([c == combo for c in per_layer]).reshape(-1, *[1] * (res.ndim - 1))
            out = jnp.where(pick, res, out)
    if not layout.stacked:
        return out[0]
    lead = (base if base is not None else inputs[0]).shape[: layout.depth]
    return out.reshape(*lead, *out.shape[1:])


@dataclass(frozen=True)
class _Job:
    """Everything static about one leaf's merge (the jit cache key)."""

    method: str
    layout: Layout
    is_vector: tuple[bool, ...]
    values: LeafValues
    dtype: str | None
    out_dtype: str
    sharding: Any


@functools.partial(jax.jit, static_argnames="job")
def _run_job(base, inputs, noise, dynamic, job: _Job):
    values = dataclasses.replace(job.values, arrays=dynamic)
    method = get_method(job.method)
    out = merge_leaf(
        method, job.layout, base, inputs, job.is_vector, values, None, job.dtype, noise
    )
    out = out.astype(job.out_dtype)
    if isinstance(job.sharding, NamedSharding):
        out = jax.lax.with_sharding_constraint(out, job.sharding)
    return out


def run_leaf(
    method: MergeMethod,
    tmap: TensorMap,
    base,
    inputs: Sequence,
    is_vector: Sequence[bool],
    values: LeafValues,
    *,
    dtype: str | None,
    out_dtype: str,
    sharding,
    key=None,
) -> jax.Array:
    """One leaf merged by the jitted executor: the static settings are the compile key,
    the continuous ones (weights, t, lambda) arguments, so other values reuse the
    program; a random method's uniforms are drawn from ``key``, sharded like the leaf."""
    static, dynamic = values.split()
    job = _Job(method.name, Layout.of(tmap), tuple(is_vector), static, dtype, out_dtype, sharding)
    noise = None
    if method.random:
        shape, depth = inputs[0].shape, tmap.depth
        draw = noise_shape(method, len(inputs), shape[depth:], math.prod(shape[:depth]))
        noise = draw_uniform(key, draw, sharding, depth)
    return _run_job(base, inputs, noise, dynamic, job)


def merge_tree(
    method: str,
    config: ModelConfig,
    base_params: dict | None,
    model_params: Sequence[dict],
    *,
    parameters: Settings | Sequence[Settings] | None = None,
    model_parameters: Sequence[Settings | None] | None = None,
    is_vector: Sequence[bool] | None = None,
    seed: int = 0,
    dtype: str | None = None,
) -> dict:
    """The merge as a pure function of parameter pytrees (float32 result).

    For use inside your own ``jax.jit`` (e.g. a weight search): settings may hold
    traced scalars (``{"weight": w[i]}``). Counts of magnitude methods are exact
    mergekit counts only when densities are concrete.
    """
    m = engine_method(method)
    chain = settings_chain(parameters)
    n = len(model_params)
    model_parameters = list(model_parameters or [None] * n)
    is_vector = tuple(is_vector or [False] * n)
    labels = [f"models[{i}]" for i in range(n)]
    out: dict = {}
    for tmap in tensor_maps(config):
        values = resolve_leaf(
            m, tmap, config.num_layers, chain, model_parameters, labels, config.num_experts
        )
        leaves = [get_leaf(p, tmap.path) for p in model_params]
        base = None if base_params is None else get_leaf(base_params, tmap.path)
        key = leaf_key(seed, tmap) if m.random else None
        set_leaf(
            out,
            tmap.path,
            merge_leaf(m, Layout.of(tmap), base, leaves, is_vector, values, key, dtype),
        )
    return out


def engine_method(name: str) -> MergeMethod:
    """A method this leaf-by-leaf engine computes (not one that reads data)."""
    m = get_method(name)
    if m.data:
        raise DemError(
            f"merge_method {m.name} needs data per model: use dem_jax.merge.with_data, or a "
            "MERGE.yaml with a data file per model (dem-jax merge)"
        )
    return m


# ------------------------------------------------------------------ a whole merge


class MergePlan:
    """A checked merge of opened inputs, ready to produce its leaves."""

    def __init__(
        self,
        method: str,
        base,
        models: Sequence[MergeInput | Model | Vector | str | os.PathLike],
        *,
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
        self.allow_crimes = allow_crimes  # see vectors.vector.check_compatible
        inputs = [x if isinstance(x, MergeInput) else MergeInput(x) for x in models]
        check_input_count(m, len(inputs), base is not None)
        self.chain = settings_chain(parameters)
        for settings in self.chain:
            check_parameters(m, settings, "parameters", per_model=False)
        labels = [
            x.name or (str(x.source) if isinstance(x.source, str | os.PathLike) else f"models[{i}]")
            for i, x in enumerate(inputs)
        ]
        for x, label in zip(inputs, labels, strict=True):
            check_parameters(m, x.parameters, f"{label}: parameters", per_model=True)
        self.labels, self.settings = labels, [x.parameters for x in inputs]
        self.sources: list[Source] = []
        try:
            self.base = None
            if base is not None:
                base_label = str(base) if isinstance(base, str | os.PathLike) else "base model"
                self.base = open_source(base, base_label, mesh, streaming)
                self.sources.append(self.base)
                if self.base.is_vector:
                    raise DemError(f"{base_label}: the base must be a model, not a vector")
            self.models = []
            for x, label in zip(inputs, labels, strict=True):
                self.models.append(open_source(x.source, label, mesh, streaming))
                self.sources.append(self.models[-1])
            self._check(mesh, dtype, out_dtype, seed, tokenizer_source)
        except BaseException:
            self.close()
            raise

    def _check(self, mesh, dtype, out_dtype, seed, tokenizer_source):
        m, ref = self.method, self.base or self.models[0]
        for src in self.models:
            check_compatible(ref.config, src.config, ref.label, src.label, self.allow_crimes)
            if src.is_vector and self.base is None:
                raise DemError(f"{src.label}: a vector input needs a base model")
        self.config = ref.config
        self.is_vector = tuple(s.is_vector for s in self.models)
        self._settle(mesh, dtype, out_dtype, seed, tokenizer_source, [self.base, *self.models])
        # Every parameter of every leaf resolved up front: bad settings fail before any read.
        self.values = {
            tmap.path: resolve_leaf(
                m,
                tmap,
                self.config.num_layers,
                self.chain,
                self.settings,
                self.labels,
                self.config.num_experts,
            )
            for tmap in tensor_maps(self.config)
        }

    def _settle(self, mesh, dtype, out_dtype, seed, tokenizer_source, sources) -> None:
        """Dtypes, seed, shardings (of ``self.config``), and the output's assets and HF
        config: the first of ``sources`` (in order of preference) that has them."""
        self.dtype = dtype
        models = [s for s in sources if s is not None and not s.is_vector]
        promoted = functools.reduce(
            jnp.promote_types, [jnp.dtype(s.config.param_dtype) for s in models]
        )
        self.out_dtype = out_dtype or dtype or str(jnp.dtype(promoted))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DemError(f"seed: expected a non-negative integer, got {seed!r}")
        self.seed = seed
        self.shardings = param_shardings(self.config, mesh)
        tok = tokenizer_source
        self.assets_dir = (
            storage.path(tok)
            if tok is not None
            else next((s.assets_dir for s in models if s.assets_dir is not None), None)
        )
        self.hf_config = next((s.hf_config for s in models if s.hf_config is not None), None)

    def output_config(self) -> ModelConfig:
        """The merged model's config (the reference model's, in the output dtype)."""
        return self.config.replace(param_dtype=self.out_dtype)

    def leaves(self) -> Iterator[tuple[TensorMap, jax.Array]]:
        """(key-map entry, merged leaf) for every parameter, in export order."""
        for tmap in tensor_maps(self.config):
            sharding = get_leaf(self.shardings, tmap.path)
            base = None if self.base is None else self.base.read(tmap, sharding)
            inputs = [s.read(tmap, sharding) for s in self.models]
            key = leaf_key(self.seed, tmap) if self.method.random else None
            yield (
                tmap,
                run_leaf(
                    self.method,
                    tmap,
                    base,
                    inputs,
                    self.is_vector,
                    self.values[tmap.path],
                    dtype=self.dtype,
                    out_dtype=self.out_dtype,
                    sharding=sharding,
                    key=key,
                ),
            )
            del base, inputs

    def metadata(self) -> dict[str, Any]:
        """JSON-able provenance stored with the output."""
        return {
            "merge": {
                "method": self.method.name,
                "base": None if self.base is None else self.base.label,
                "models": list(self.labels),
                "seed": self.seed,
            }
        }

    def to_model(self) -> Model:
        """Run the merge, collecting the output on its shardings."""
        params: dict = {}
        for tmap, leaf in self.leaves():
            set_leaf(params, tmap.path, leaf)
        return Model(self.output_config(), params, self.hf_config, self.assets_dir, self.metadata())

    def close(self) -> None:
        """Close every input."""
        for s in self.sources:
            s.close()


def merge(method: str, base, models, **options) -> Model:
    """Merge ``models`` (MergeInput, Model, Vector or paths) into ``base`` with ``method``.

    Options: ``parameters`` (global settings, or a list of them, highest precedence
    first), ``seed``, ``mesh``, ``dtype`` (round inputs to it first), ``out_dtype``,
    ``streaming`` (read input leaves on demand instead of loading every input),
    ``tokenizer_source`` (directory whose tokenizer files the output carries).
    Returns the merged :class:`~dem_jax.io.modeldir.Model` on the mesh.
    """
    run = MergePlan(method, base, models, **options)
    try:
        return run.to_model()
    finally:
        run.close()
