"""The merge engine: mergekit's methods over whole models, one parameter at a time.

    merged = merge("dem", base, [MergeInput(v, {"weight": 0.7}) for v in vectors])
    merge_to_directory("out", "ties", "base/", [MergeInput("ft1/", {"weight": 1, "density": 0.5})])

Every parameter (a *leaf*, with all decoder layers stacked on its leading axis)
is merged by one jitted function of the inputs' leaves, with the leaf's own
sharding, so a merge runs on a device mesh without gathering a model on one
host. The math is :mod:`dem_jax.merge_methods`; this module adds what a whole
model needs:

* **Per-tensor semantics.** mergekit merges each Hugging Face tensor on its
  own, and one HF tensor is one layer of one of our leaves, so every
  whole-tensor statistic (top-k counts, L1 rescaling, SLERP angles, Model Stock
  cosines) is taken per layer, DELLA ranks and Model Stock ``filter_wise`` rows
  follow the HF layout, and each parameter (weight, density, ...) is resolved
  per layer from its HF name (mergekit's ``filter`` and gradients; see
  :mod:`dem_jax.mergekit_config`).
* **Seeds.** Random methods derive each leaf's key from the seed and the leaf's
  name and draw over the full array with ``jax.random`` (threefry is
  partitionable), so the draw does not depend on the mesh.
* **Precision.** Inputs are rounded to ``dtype`` when given (as mergekit loads
  them), then merged in float32; the result is cast to the output dtype.
* **Two executors, one kernel.** In memory (every input loaded, then merged
  leaf by leaf) or streaming (each input leaf read from its checkpoint when
  needed: Orbax restores one leaf, Hugging Face reads its tensors), so peak
  memory is the output plus a few copies of one leaf per input instead of
  every input model (a leaf holds one parameter of every layer, at most about
  a fifth of a Llama model; numbers in bench/bench_merge.py). A Hugging Face
  output is written leaf by leaf, so it is not held either. Both executors
  call the same jitted function, so they agree bit for bit.

Inputs are models (Θ_i) or distribution vectors (ΔΘ_i, :mod:`dem_jax.vectors`);
task-arithmetic methods use a vector as it is, the others use Θ + ΔΘ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding

from dem_jax.api import load_model, save_model
from dem_jax.config.run import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    finish_hf_directory,
    hf_writer,
    read_json,
)
from dem_jax.io.hf.config import from_hf_config, to_hf_config
from dem_jax.io.hf.safetensors_io import SafetensorsCheckpoint
from dem_jax.io.hf.weights import TensorMap, check_checkpoint, hf_tensor_specs, tensor_maps
from dem_jax.io.modeldir import HF_CONFIG, Model, atomic_directory, model_format
from dem_jax.io.orbax import read_metadata
from dem_jax.merge import kernels as mm
from dem_jax.merge.config import (
    MergeRequest,
    Method,
    check_layer_ranges,
    check_parameters,
    get_method,
    load_merge_config,
    resolve,
)
from dem_jax.model.transformer import param_shapes
from dem_jax.sharding.rules import param_shardings
from dem_jax.vectors.vector import (
    PARAMS_DIR,
    Vector,
    check_compatible,
    describe,
    get_leaf,
    is_vector_dir,
    load_vector,
    set_leaf,
    vector_config,
)

_F32 = jnp.float32
Settings = Mapping[str, Any]


@dataclass(frozen=True)
class MergeInput:
    """One fine-tuned input: a model or vector (in memory or a directory) and its
    per-model parameter settings (``weight``, ``density``, ...; mergekit syntax)."""

    source: Model | Vector | str | os.PathLike
    parameters: Settings | None = None
    name: str | None = None  # for messages; defaults to the path


# ------------------------------------------------------------------ resolved parameters


@dataclass(frozen=True)
class Layout:
    """How one leaf maps onto Hugging Face tensors (see ``dem_jax.hf.weights.TensorMap``)."""

    stacked: bool  # leading layers axis: one HF tensor per layer
    split: int  # per-layer dims that flatten into the HF matrix's rows (ours)
    transpose: bool  # the HF tensor is that matrix transposed

    @classmethod
    def of(cls, tmap: TensorMap) -> Layout:
        """The layout of one key-map entry."""
        return cls(tmap.stacked, tmap.split, tmap.transpose)


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
        return jnp.asarray([[jnp.asarray(v, _F32) for v in row] for row in rows], _F32)

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
        return jnp.stack([jnp.asarray(v, _F32) for v in values])


def layer_names_and_ts(tmap: TensorMap, num_layers: int) -> tuple[list[str], list[float]]:
    """HF tensor name and gradient position ``t`` of each layer of a leaf (mergekit:
    ``t = i / (L - 1)`` over the layers; embeddings, final norm and lm_head ``t = 0``)."""
    if not tmap.stacked:
        return [tmap.hf_name], [0.0]
    ts = [i / (num_layers - 1) if num_layers > 1 else 1.0 for i in range(num_layers)]
    return [tmap.hf_name.format(i=i) for i in range(num_layers)], ts


def resolve_leaf(
    method: Method,
    tmap: TensorMap,
    num_layers: int,
    chain: Sequence[Settings | None],
    model_settings: Sequence[Settings | None],
    labels: Sequence[str],
) -> LeafValues:
    """Every parameter of ``method`` for every model and layer of one leaf."""
    names, ts = layer_names_and_ts(tmap, num_layers)
    per_model, shared = [], []
    for spec in method.params:
        if spec.per_model:
            rows = tuple(
                tuple(
                    resolve(spec, [settings, *chain], name, t, label)
                    for name, t in zip(names, ts, strict=True)
                )
                for settings, label in zip(model_settings, labels, strict=True)
            )
            per_model.append((spec.name, rows))
        else:
            values = tuple(
                resolve(spec, chain, name, t, "parameters")
                for name, t in zip(names, ts, strict=True)
            )
            shared.append((spec.name, values))
    values = LeafValues(tuple(per_model), tuple(shared))
    if method.sparsify == "della":
        _check_della(values, names, labels)
    return values


def _check_della(values: LeafValues, names: list[str], labels: Sequence[str]) -> None:
    """mergekit raises unless density ± epsilon lies in (0, 1) (for 0 < density < 1)."""
    dens, eps = dict(values.per_model)["density"], dict(values.per_model)["epsilon"]
    for label, drow, erow in zip(labels, dens, eps, strict=True):
        for name, d, e in zip(names, drow, erow, strict=True):
            concrete = isinstance(d, float) and isinstance(e, float)
            if concrete and 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise DemError(
                    f"{label}: for tensor {name}, density ± epsilon must lie in (0, 1); "
                    f"got density={d}, epsilon={e}"
                )


def leaf_key(seed: int, tmap: TensorMap) -> jax.Array:
    """The random key of one leaf: the seed folded with a stable hash of its name."""
    digest = zlib.crc32(".".join(tmap.path).encode()) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.key(seed), digest)


# ------------------------------------------------------------------ one leaf


def _to_hf(x: jax.Array, layout: Layout, lead: int) -> jax.Array:
    """(*lead, *layer_shape) -> (*lead, *hf_shape): the HF tensor of each layer."""
    pre, shape = x.shape[:lead], x.shape[lead:]
    rows = math.prod(shape[: layout.split])
    if layout.split >= len(shape):
        return x.reshape(*pre, rows)
    m = x.reshape(*pre, rows, -1)
    return jnp.swapaxes(m, -1, -2) if layout.transpose else m


def _from_hf(m: jax.Array, layout: Layout, shape: tuple[int, ...], lead: int) -> jax.Array:
    """Inverse of :func:`_to_hf`; ``shape`` is the full (*lead, *layer_shape)."""
    if layout.transpose and layout.split < len(shape) - lead:  # a transposed matrix
        m = jnp.swapaxes(m, -1, -2)
    return m.reshape(shape)


def _sparsify(method, layout, deltas, values: LeafValues, noise, rescale: bool):
    """Sparsify each (layer, model) tensor on its own: (L, N, *s) -> (L, N, *s)."""
    n_layers, n = deltas.shape[:2]
    flat = deltas.reshape(n_layers * n, *deltas.shape[2:])  # layer-major, like `noise`

    def rows(name):  # (N, L) values -> one per row of `flat`
        return values.model(name).T.reshape(-1)

    norm = "l1" if rescale else False  # mergekit 0.1.5: rescale -> RescaleNorm.l1
    if method.sparsify == "magnitude":
        out = mm.sparsify_magnitude(flat, rows("density"), rescale=norm)
    elif method.sparsify == "random":
        out = mm.sparsify_random(flat, rows("density"), None, norm, uniform=noise)
    elif method.sparsify == "breadcrumbs":
        out = mm.sparsify_breadcrumbs(flat, rows("density"), rows("gamma"), rescale=norm)
    else:  # della ranks within the rows of the HF tensor (torch dim 1)
        hf = _to_hf(flat, layout, lead=1)
        u = None if noise is None else _to_hf(noise, layout, lead=1)
        out = mm.sparsify_della(
            hf, rows("density"), rows("epsilon"), None, norm, rank_axis=1, uniform=u
        )
        out = _from_hf(out, layout, flat.shape, lead=1)
    return out.reshape(deltas.shape)


# Kernels see the leaf as (L, N, *s): layers first, so each vmap over layers reads
# its operands in place (a vmap over axis 1 would transpose every input first).


def _gta(method, layout, base, xs, is_vector, values, noise, flags):
    deltas = jnp.stack(
        [xs[:, i] if vec else xs[:, i] - base for i, vec in enumerate(is_vector)], axis=1
    )
    if method.sparsify:
        deltas = _sparsify(method, layout, deltas, values, noise, flags["rescale"])
    weights = jnp.asarray(values.model("weight"), _F32)  # (N, L)
    lam = jnp.asarray(values.shared_array("lambda"), _F32)  # (L,)

    def one_layer(b, d, w, lam_l):
        return mm.generalized_task_arithmetic(
            b, d, w, consensus=method.consensus, normalize=flags["normalize"], lam=lam_l
        )

    return jax.vmap(one_layer, in_axes=(0, 0, 1, 0))(base, deltas, weights, lam)


def _linear(method, layout, base, xs, is_vector, values, noise, flags):
    weights = jnp.asarray(values.model("weight"), _F32)
    return jax.vmap(lambda m, w: mm.linear(m, w, flags["normalize"]), in_axes=(0, 1))(xs, weights)


def _slerp(method, layout, base, xs, is_vector, values, noise, flags):
    t = jnp.asarray(values.shared_array("t"), _F32)
    return jax.vmap(mm.slerp)(base, xs[:, 0], t)


def _model_stock(method, layout, base, xs, is_vector, values, noise, flags):
    if not flags["filter_wise"]:
        return jax.vmap(mm.model_stock)(base, xs)
    # filter_wise rows are the rows of each HF tensor
    hb, hx = _to_hf(base, layout, lead=1), _to_hf(xs, layout, lead=2)
    out = jax.vmap(functools.partial(mm.model_stock, filter_wise=True))(hb, hx)
    return _from_hf(out, layout, base.shape, lead=1)


def _parameter_selection(method, layout, base, xs, is_vector, values, noise, flags):
    return jax.vmap(lambda m, u: mm.parameter_selection(m, None, uniform=u))(xs, noise)


_KERNELS = {
    "gta": _gta,
    "linear": _linear,
    "slerp": _slerp,
    "model_stock": _model_stock,
    "parameter_selection": _parameter_selection,
}
_STATIC_FLAGS = {
    "gta": ("normalize", "rescale"),
    "linear": ("normalize",),
    "model_stock": ("filter_wise",),
}


def merge_leaf(
    method: Method,
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
        x = x.astype(_F32)
        return x if layout.stacked else x[None]

    b = None if base is None else prep(base, False)
    xs = [prep(x, v) for x, v in zip(inputs, is_vector, strict=True)]
    if method.kind != "gta":  # the other methods work on models: Θ_i = Θ + ΔΘ_i
        xs = [x + b if v else x for x, v in zip(xs, is_vector, strict=True)]
    xs = jnp.stack(xs, axis=1)  # (L, N, *s)
    if method.random:
        shape = noise_shape(method, len(inputs), xs.shape[2:], xs.shape[0])
        noise = jax.random.uniform(key, shape) if noise is None else noise.reshape(shape)
        noise = jnp.moveaxis(noise, -1, 0)  # (K, *layer_shape)

    names = _STATIC_FLAGS.get(method.kind, ())
    per_layer = [tuple(values.shared_values(n)[i] for n in names) for i in range(xs.shape[0])]
    out = None
    for combo in dict.fromkeys(per_layer):
        flags = dict(zip(names, combo, strict=True))
        res = _KERNELS[method.kind](method, layout, b, xs, is_vector, values, noise, flags)
        if out is None:
            out = res
        else:
            pick = np.asarray([c == combo for c in per_layer]).reshape(-1, *[1] * (res.ndim - 1))
            out = jnp.where(pick, res, out)
    return out if layout.stacked else out[0]


def noise_shape(method: Method, n: int, layer_shape, num_layers: int) -> tuple[int, ...]:
    """Shape of one leaf's uniforms: ``(*layer_shape, K)`` with K = L·N (layer-major) for
    sparsifiers and K = L for parameter selection; moved to the front before use.

    The (model, layer) axis comes last so that, collapsed by :func:`_draw_layout`,
    a draw on a mesh has at most two dimensions (cheap to compile); partitionable
    threefry's values depend only on the row-major index, so any such reshape
    gives the same numbers.
    """
    k = num_layers if method.kind == "parameter_selection" else n * num_layers
    return (*layer_shape, k)


def _draw_layout(shape: tuple[int, ...], spec: tuple) -> tuple[tuple[int, ...], tuple]:
    """Merge every unsharded dimension into its left neighbour: still a valid tiling of
    the same row-major array, of lower rank."""
    dims: list[list] = []
    for size, axis in zip(shape, spec, strict=True):
        if dims and axis is None:
            dims[-1][0] *= size
        else:
            dims.append([size, axis])
    return tuple(d[0] for d in dims), tuple(d[1] for d in dims)


@functools.lru_cache(maxsize=64)
def _uniform_fn(sharding):
    # One compiled draw per (shape, sharding), shared by every random method and
    # merge: threefry is the slowest thing here to compile, so it stays out of the
    # per-method jobs.
    return jax.jit(jax.random.uniform, static_argnums=1, out_shardings=sharding)


def _draw(key, shape: tuple[int, ...], leaf_sharding, stacked: bool) -> jax.Array:
    """``jax.random.uniform(key, shape)`` (``shape`` from :func:`noise_shape`), drawn
    sharded like the leaf so each device draws only its slice; returned collapsed
    (:func:`_draw_layout`)."""
    if not isinstance(leaf_sharding, NamedSharding):
        return _uniform_fn(leaf_sharding)(key, (math.prod(shape),))
    spec = tuple(leaf_sharding.spec) + (None,) * (
        len(shape) + stacked - 1 - len(leaf_sharding.spec)
    )
    spec = (*(spec[1:] if stacked else spec), None)  # layer axis dropped, K axis last
    flat_shape, flat_spec = _draw_layout(shape, spec)
    sharding = NamedSharding(leaf_sharding.mesh, jax.sharding.PartitionSpec(*flat_spec))
    return _uniform_fn(sharding)(key, flat_shape)


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


def merge_params(
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
    m = _engine_method(method)
    chain = _chain(parameters)
    n = len(model_params)
    model_parameters = list(model_parameters or [None] * n)
    is_vector = tuple(is_vector or [False] * n)
    labels = [f"models[{i}]" for i in range(n)]
    out: dict = {}
    for tmap in tensor_maps(config):
        values = resolve_leaf(m, tmap, config.num_layers, chain, model_parameters, labels)
        leaves = [get_leaf(p, tmap.path) for p in model_params]
        base = None if base_params is None else get_leaf(base_params, tmap.path)
        key = leaf_key(seed, tmap) if m.random else None
        set_leaf(
            out,
            tmap.path,
            merge_leaf(m, Layout.of(tmap), base, leaves, is_vector, values, key, dtype),
        )
    return out


def _engine_method(name: str) -> Method:
    """A method this leaf-by-leaf engine computes (not one that reads data)."""
    m = get_method(name)
    if m.data:
        raise DemError(
            f"merge_method {m.name} needs data per model: use dem_jax.data_merge, or a "
            "MERGE.yaml with a data file per model (dem-jax merge)"
        )
    return m


def _chain(parameters) -> list[Settings | None]:
    if parameters is None:
        return []
    if isinstance(parameters, Mapping):
        return [parameters]
    return list(parameters)


# ------------------------------------------------------------------ where leaves come from


class _Source:
    """A model or vector whose leaves can be read one at a time."""

    label: str
    config: ModelConfig
    is_vector: bool = False
    hf_config: dict | None = None
    assets_dir: Path | None = None

    def read(self, tmap: TensorMap, sharding) -> jax.Array:
        """One leaf, on ``sharding``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


class _MemorySource(_Source):
    def __init__(self, item: Model | Vector, label: str):
        self.label, self.config, self.params = label, item.config, item.params
        self.is_vector = isinstance(item, Vector)
        if isinstance(item, Model):
            self.hf_config, self.assets_dir = item.hf_config, item.assets_dir

    def read(self, tmap, sharding):
        x = get_leaf(self.params, tmap.path)
        return x if x.sharding == sharding else jax.device_put(x, sharding)


class _OrbaxSource(_Source):
    """A dem-jax model or vector directory; one leaf restored per read."""

    def __init__(self, directory: Path, label: str, is_vector: bool):
        self.label, self.is_vector = label, is_vector
        if is_vector:
            self.config = vector_config(directory)
        else:
            meta = read_metadata(directory)
            self.config = ModelConfig.from_dict(meta["model"], where=str(directory))
            self.hf_config, self.assets_dir = meta.get("hf_config"), directory
        self.params_dir = (directory / PARAMS_DIR).absolute()
        try:
            tree = ocp.StandardCheckpointer().metadata(self.params_dir).item_metadata.tree
        except Exception as e:  # Orbax raises many types for unreadable checkpoints
            raise DemError(
                f"{self.params_dir}: unreadable Orbax checkpoint ({_first_line(e)})"
            ) from None
        shapes = param_shapes(self.config)
        self.dtypes = {}
        for tmap in tensor_maps(self.config):
            try:
                stored = get_leaf(tree, tmap.path)
            except (KeyError, TypeError):
                raise DemError(f"{self.params_dir}: missing parameter {describe(tmap)}") from None
            want = tuple(get_leaf(shapes, tmap.path).shape)
            if tuple(stored.shape) != want:
                raise DemError(
                    f"{self.params_dir}: parameter {describe(tmap)} has shape "
                    f"{list(stored.shape)}, its config implies {list(want)}"
                )
            self.dtypes[tmap.path] = stored.dtype
        self._ckptr = ocp.PyTreeCheckpointer()

    def read(self, tmap, sharding):
        shape = tuple(get_leaf(param_shapes(self.config), tmap.path).shape)
        target: dict = {}
        set_leaf(
            target,
            tmap.path,
            jax.ShapeDtypeStruct(shape, self.dtypes[tmap.path], sharding=sharding),
        )
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        try:
            return get_leaf(self._ckptr.restore(self.params_dir, args=args), tmap.path)
        except Exception as e:  # Orbax raises many types for corrupt data
            raise DemError(
                f"{self.params_dir}: cannot read {describe(tmap)} ({_first_line(e)})"
            ) from None


class _HFSource(_Source):
    """A Hugging Face directory; each read loads one leaf's tensors (all its layers)."""

    def __init__(self, directory, label: str):
        self.label, self.assets_dir = label, directory
        self.hf_config = read_json(directory / HF_CONFIG)
        self.ckpt = SafetensorsCheckpoint(directory)
        config = from_hf_config(self.hf_config, str(directory / HF_CONFIG))
        if "model.embed_tokens.weight" not in self.ckpt:
            raise DemError(f"{directory}: missing tensor model.embed_tokens.weight")
        stored = str(jnp.dtype(self.ckpt.dtype("model.embed_tokens.weight")))
        self.config = config.replace(param_dtype=stored, dtype=stored)
        check_checkpoint(self.ckpt, self.config, str(directory))

    def read(self, tmap, sharding):
        shape = tuple(get_leaf(param_shapes(self.config), tmap.path).shape)
        dtype = np.dtype(jnp.dtype(self.config.param_dtype))
        cache: dict[int | None, np.ndarray] = {}  # each layer read once, whatever the sharding

        def layer(i, layer_shape):
            if i not in cache:
                t = self.ckpt.read(tmap.hf_name.format(i=i) if tmap.stacked else tmap.hf_name)
                t = t.T if tmap.transpose else t
                cache[i] = np.asarray(t).reshape(layer_shape).astype(dtype, copy=False)
            return cache[i]

        def callback(index):
            if not tmap.stacked:
                return layer(None, shape)[index]
            rows = range(*index[0].indices(shape[0]))
            return np.stack([layer(i, shape[1:])[index[1:]] for i in rows])

        array = jax.make_array_from_callback(shape, sharding, callback)
        # Unmap the files: pages read through a live mapping count in this process's
        # resident set, which would grow to every input's full size (the next read
        # maps them again).
        self.ckpt.close()
        return array

    def close(self):
        self.ckpt.close()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def open_source(item, label: str, mesh: Mesh | None, streaming: bool) -> _Source:
    """A leaf source for a Model, a Vector or a directory (HF, dem-jax model or vector)."""
    if isinstance(item, Model | Vector):
        return _MemorySource(item, label)
    if not isinstance(item, str | os.PathLike):
        raise DemError(f"{label}: expected a model, a vector or a path, got {type(item).__name__}")
    path = storage.path(item)
    if is_vector_dir(path):
        return (
            _OrbaxSource(path, label, True)
            if streaming
            else _MemorySource(load_vector(path, mesh), label)
        )
    fmt = model_format(path)
    if not streaming:
        return _MemorySource(load_model(path, mesh=mesh), label)
    return _HFSource(path, label) if fmt == "hf" else _OrbaxSource(path, label, False)


# ------------------------------------------------------------------ a whole merge


class _Merge:
    """A checked merge, ready to produce its leaves."""

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
    ):
        self.method = m = _engine_method(method)
        inputs = [x if isinstance(x, MergeInput) else MergeInput(x) for x in models]
        if m.base == "required" and base is None:
            raise DemError(f"merge_method {m.name} needs a base model")
        if len(inputs) < m.min_models or (m.max_models is not None and len(inputs) > m.max_models):
            want = m.min_models if m.max_models == m.min_models else f"at least {m.min_models}"
            raise DemError(
                f"merge_method {m.name} needs {want} model(s) besides the base, got {len(inputs)}"
            )
        self.chain = _chain(parameters)
        for settings in self.chain:
            check_parameters(m, settings, "parameters", per_model=False)
        labels = [
            x.name or (str(x.source) if isinstance(x.source, str | os.PathLike) else f"models[{i}]")
            for i, x in enumerate(inputs)
        ]
        for x, label in zip(inputs, labels, strict=True):
            check_parameters(m, x.parameters, f"{label}: parameters", per_model=True)
        self.labels, self.settings = labels, [x.parameters for x in inputs]
        self.sources: list[_Source] = []
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
            check_compatible(ref.config, src.config, ref.label, src.label)
            if src.is_vector and self.base is None:
                raise DemError(f"{src.label}: a vector input needs a base model")
        self.config = ref.config
        self.is_vector = tuple(s.is_vector for s in self.models)
        self.dtype = dtype
        stored = [s.config.param_dtype for s in [self.base, *self.models] if s and not s.is_vector]
        promoted = functools.reduce(jnp.promote_types, [jnp.dtype(d) for d in stored])
        self.out_dtype = out_dtype or dtype or str(jnp.dtype(promoted))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DemError(f"seed: expected a non-negative integer, got {seed!r}")
        self.seed = seed
        self.shardings = param_shardings(self.config, mesh)
        # Every parameter of every leaf resolved up front: bad settings fail before any read.
        self.values = {
            tmap.path: resolve_leaf(
                m, tmap, self.config.num_layers, self.chain, self.settings, self.labels
            )
            for tmap in tensor_maps(self.config)
        }
        tok = tokenizer_source
        model_srcs = [s for s in [self.base, *self.models] if s is not None and not s.is_vector]
        self.assets_dir = (
            storage.path(tok)
            if tok is not None
            else next((s.assets_dir for s in model_srcs if s.assets_dir is not None), None)
        )
        self.hf_config = next((s.hf_config for s in model_srcs if s.hf_config is not None), None)

    def output_config(self) -> ModelConfig:
        """The merged model's config (the reference model's, in the output dtype)."""
        return self.config.replace(param_dtype=self.out_dtype)

    def leaves(self) -> Iterator[tuple[TensorMap, jax.Array]]:
        """(key-map entry, merged leaf) for every parameter, in export order."""
        for tmap in tensor_maps(self.config):
            sharding = get_leaf(self.shardings, tmap.path)
            base = None if self.base is None else self.base.read(tmap, sharding)
            inputs = [s.read(tmap, sharding) for s in self.models]
            static, dynamic = self.values[tmap.path].split()
            job = _Job(
                self.method.name,
                Layout.of(tmap),
                self.is_vector,
                static,
                self.dtype,
                self.out_dtype,
                sharding,
            )
            noise = None
            if self.method.random:
                shape = inputs[0].shape
                layer_shape, n_layers = (shape[1:], shape[0]) if tmap.stacked else (shape, 1)
                draw = noise_shape(self.method, len(inputs), layer_shape, n_layers)
                noise = _draw(leaf_key(self.seed, tmap), draw, sharding, tmap.stacked)
            yield tmap, _run_job(base, inputs, noise, dynamic, job)
            del noise
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
    Returns the merged :class:`~dem_jax.modeldir.Model` on the mesh.
    """
    run = _Merge(method, base, models, **options)
    try:
        return run.to_model()
    finally:
        run.close()


def merge_to_directory(
    out: str | os.PathLike,
    method: str,
    base,
    models,
    *,
    format: str = "orbax",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    streaming: bool = True,
    **options,
) -> Path:
    """Merge and write ``out`` as ``"orbax"`` or ``"hf"``, atomically (complete or absent).

    With ``streaming`` and ``format="hf"`` each merged leaf is written as soon as
    it is computed, so peak memory is one parameter per input plus one output
    leaf; an Orbax output is collected on the mesh first and saved at the end.
    """
    check_output(out, format, overwrite)
    run = _Merge(method, base, models, streaming=streaming, **options)
    try:
        if streaming and format == "hf":
            return _write_hf(run, out, overwrite, max_shard_bytes)
        model = run.to_model()
    finally:
        run.close()
    return write_model(
        model, out, format=format, overwrite=overwrite, max_shard_bytes=max_shard_bytes
    )


def check_output(out: str | os.PathLike, format: str, overwrite: bool) -> None:
    """``format`` is ``"hf"`` or ``"orbax"`` and ``out`` is free (or may be replaced)."""
    if format not in ("orbax", "hf"):
        raise DemError(f"--format: must be 'hf' or 'orbax', got {format!r}")
    if storage.path(out).exists() and not overwrite:
        raise DemError(f"{out}: output already exists (pass --overwrite to replace it)")


def write_model(
    model: Model,
    out: str | os.PathLike,
    *,
    format: str = "orbax",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a merged model held in memory as ``"orbax"`` or ``"hf"``, complete or absent."""
    kwargs = {"max_shard_bytes": max_shard_bytes} if format == "hf" else {}
    return save_model(model, out, format=format, overwrite=overwrite, **kwargs)


def _host(leaf: jax.Array) -> np.ndarray:
    if not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _write_hf(run: _Merge, out, overwrite: bool, max_shard_bytes: int) -> Path:
    """Write the merge as a Hugging Face directory, one leaf at a time."""
    config = run.output_config()
    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    with atomic_directory(out, overwrite) as tmp:
        specs = hf_tensor_specs(config, np_dtype)
        with hf_writer(tmp, specs, max_shard_bytes) as writer:
            for tmap, leaf in run.leaves():
                host = _host(leaf)
                del leaf
                layers = host if tmap.stacked else host[None]
                names = layer_names_and_ts(tmap, config.num_layers)[0]
                for name, one in zip(names, layers, strict=True):
                    rows = math.prod(one.shape[: tmap.split])
                    mat = one.reshape(rows, -1) if tmap.split < one.ndim else one.reshape(rows)
                    writer.write(name, np.ascontiguousarray(mat.T if tmap.transpose else mat))
        finish_hf_directory(tmp, to_hf_config(config, run.hf_config), run.assets_dir)
    return storage.path(out)


# ------------------------------------------------------------------ MERGE.yaml


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
) -> Path:
    """Run a mergekit MERGE.yaml (see :mod:`dem_jax.mergekit_config`) into ``out``.

    Methods that read data (fisher, regmean) run in memory through
    :func:`dem_jax.data_merge.merge_with_data` (``streaming`` and ``seed`` do not apply).
    """
    req = config if isinstance(config, MergeRequest) else load_merge_config(config)
    if storage.path(out).exists() and not overwrite:
        raise DemError(f"{out}: output already exists (pass --overwrite to replace it)")
    if seed is not None and seed < 0:
        raise DemError(f"--seed: expected a non-negative integer, got {seed}")
    inputs = [
        MergeInput(p, s, str(p)) for p, s in zip(req.models, req.model_parameters, strict=True)
    ]
    try:
        check_layer_ranges(req)
        if get_method(req.method).data:
            from dem_jax.merge.with_data import merge_with_data

            return merge_with_data(
                req,
                out,
                format=format,
                overwrite=overwrite,
                mesh=mesh,
                max_shard_bytes=max_shard_bytes,
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
            seed=req.seed if seed is None else seed,
            mesh=mesh,
            dtype=req.dtype,
            out_dtype=req.out_dtype,
            tokenizer_source=req.tokenizer_source,
        )
    except DemError as e:  # name the YAML file in every message about its contents
        where = str(req.source)
        raise DemError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
