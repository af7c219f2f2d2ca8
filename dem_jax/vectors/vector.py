"""Distribution vectors ΔΘ_i = Θ_i − Θ and their diagnostics.

A vector is a float32 parameter pytree laid out like the model's (layers
stacked on a leading axis, tied embeddings stored once). It is computed under
``jax.jit`` with the parameters' own shardings, so a vector of a model spread
over a mesh never gathers on one host. On disk it is a dem-jax-style
directory: Orbax ``params/`` plus ``dem_jax_vector.json`` holding the model
config and the base and fine-tuned paths.

    vec = distribution_vector(base, finetuned, name="code")
    save_vector(vec, "out/vectors/code")
    diag = vector_diagnostics([load_vector(p) for p in paths])
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from dem_jax.config.run import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.weights import TensorMap, tensor_maps
from dem_jax.io.modeldir import Model, atomic_directory
from dem_jax.io.orbax import read_format_json
from dem_jax.model.transformer import param_shapes
from dem_jax.sharding.rules import param_shardings

VECTOR_METADATA = "dem_jax_vector.json"
FORMAT_NAME = "dem-jax-vector"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
_LAYER_PREFIX = "model.layers.{i}."


@dataclass
class Vector:
    """A distribution vector: float32 ΔΘ laid out like ``config``'s parameters."""

    config: ModelConfig  # the model's architecture; param_dtype is float32
    params: dict[str, Any]  # nested dict of float32 jax.Arrays, shaped like the model's
    name: str | None = None
    base_path: str | None = None  # where Θ came from (provenance only)
    model_path: str | None = None  # where Θ_i came from
    metadata: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ naming and checks


def get_leaf(tree: Any, path: tuple[str, ...]) -> Any:
    """The leaf at ``path`` (a tuple of dict keys) of a nested dict."""
    for key in path:
        tree = tree[key]
    return tree


def set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Store ``value`` at ``path`` in a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def group_name(tmap: TensorMap) -> str:
    """Parameter-group name of a leaf: its Hugging Face name without the layer prefix
    (``self_attn.q_proj.weight``, ``model.embed_tokens.weight``)."""
    return tmap.hf_name.removeprefix(_LAYER_PREFIX)


def describe(tmap: TensorMap) -> str:
    """A leaf as users know it: HF name (``*`` for the layer index) and our path."""
    return f"{tmap.hf_name.replace('{i}', '*')} ({'.'.join(tmap.path)})"


def check_compatible(ref: ModelConfig, other: ModelConfig, ref_name: str, other_name: str) -> None:
    """DemError naming ``other_name`` and the parameter unless both configs have the same
    architecture and every parameter the same shape (dtypes may differ)."""
    if ref.architecture != other.architecture:
        raise DemError(
            f"{other_name}: architecture {other.architecture!r} does not match "
            f"{ref_name} ({ref.architecture!r})"
        )
    ref_maps = {tm.path: tm for tm in tensor_maps(ref)}
    other_maps = {tm.path: tm for tm in tensor_maps(other)}
    ref_shapes, other_shapes = param_shapes(ref), param_shapes(other)
    for path, tmap in ref_maps.items():
        if path not in other_maps:
            raise DemError(f"{other_name}: has no parameter {describe(tmap)}, {ref_name} has")
        a = tuple(get_leaf(ref_shapes, path).shape)
        b = tuple(get_leaf(other_shapes, path).shape)
        if a != b:
            raise DemError(
                f"{other_name}: parameter {describe(tmap)} has shape {list(b)}, "
                f"{ref_name} has {list(a)}"
            )
    for path, tmap in other_maps.items():
        if path not in ref_maps:
            raise DemError(f"{other_name}: has parameter {describe(tmap)}, {ref_name} has not")


# ------------------------------------------------------------------ computing vectors


def _f32_config(config: ModelConfig) -> ModelConfig:
    return config.replace(param_dtype="float32")


def _subtract(finetuned, base):
    return jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), finetuned, base)


def distribution_vector(
    base: Model,
    finetuned: Model,
    *,
    name: str | None = None,
    base_path: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
) -> Vector:
    """ΔΘ = Θ_i − Θ for every parameter, in float32, under jit.

    The result takes the base parameters' shardings, so on a mesh each device
    computes only its own shard. Mismatched architectures or shapes raise a
    DemError naming the model (``name`` or ``model_path``) and the parameter.
    """
    label = name or (str(model_path) if model_path else "fine-tuned model")
    base_label = str(base_path) if base_path else "base model"
    check_compatible(base.config, finetuned.config, base_label, label)
    shardings = jax.tree.map(lambda x: x.sharding, base.params)
    params = jax.jit(_subtract, out_shardings=shardings)(finetuned.params, base.params)
    return Vector(
        _f32_config(base.config),
        params,
        name=name,
        base_path=None if base_path is None else str(base_path),
        model_path=None if model_path is None else str(model_path),
    )


# ------------------------------------------------------------------ saving and loading


def is_vector_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dem-jax vector directory."""
    return (storage.path(path) / VECTOR_METADATA).is_file()


def save_vector(vector: Vector, out: str | os.PathLike, overwrite: bool = False) -> storage.AnyPath:
    """Write ``vector`` as a dem-jax vector directory, atomically (complete or absent)."""
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": vector.name,
        "base": vector.base_path,
        "finetuned": vector.model_path,
        "model": _f32_config(vector.config).to_dict(),
        "metadata": vector.metadata,
    }
    with atomic_directory(out, overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(storage.absolute(tmp / PARAMS_DIR), vector.params)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:  # every process saved its shards; one writes the rest
            (tmp / VECTOR_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return storage.path(out)


def read_vector_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated ``dem_jax_vector.json`` of a vector directory."""
    directory = storage.path(directory)
    if not directory.is_dir():
        raise DemError(f"{directory}: vector directory does not exist")
    storage.check_complete(directory)
    return read_format_json(directory / VECTOR_METADATA, FORMAT_NAME, FORMAT_VERSION)


def vector_config(directory: str | os.PathLike) -> ModelConfig:
    """The model config stored with a vector directory."""
    meta = read_vector_metadata(directory)
    return ModelConfig.from_dict(
        meta["model"], where=str(storage.path(directory) / VECTOR_METADATA)
    )


def load_vector(directory: str | os.PathLike, mesh: Mesh | None = None) -> Vector:
    """Restore a vector directory onto ``mesh`` (or the default device)."""
    directory = storage.path(directory)
    meta = read_vector_metadata(directory)
    config = vector_config(directory)
    params_dir = storage.absolute(directory / PARAMS_DIR)
    if not params_dir.is_dir():
        raise DemError(f"{params_dir}: missing parameter checkpoint")
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        param_shapes(config),
        param_shardings(config, mesh),
    )
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # Orbax raises many types for unreadable or misshaped checkpoints
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DemError(f"{params_dir}: cannot restore vector ({first})") from None
    return Vector(
        config,
        params,
        name=meta.get("name"),
        base_path=meta.get("base"),
        model_path=meta.get("finetuned"),
        metadata=meta.get("metadata") or {},
    )


# ------------------------------------------------------------------ diagnostics


@jax.jit
def _leaf_stats(leaves: list[jax.Array]):
    """Per-leaf sums for the diagnostics; leaves are (L, ...) (a layer axis first)."""
    xs = [a.astype(jnp.float32) for a in leaves]
    axes = tuple(range(1, xs[0].ndim))
    sq = jnp.stack([jnp.sum(x * x, axis=axes) for x in xs])  # (N, L)
    flat = jnp.stack([x.reshape(-1) for x in xs])
    dots = jnp.einsum("ik,jk->ij", flat, flat, precision=jax.lax.Precision.HIGHEST)
    # Across vectors as chains of elementwise ops: XLA:CPU is slow to reduce an outer axis.
    pos = functools.reduce(jnp.logical_or, [x > 0 for x in xs])
    neg = functools.reduce(jnp.logical_or, [x < 0 for x in xs])
    nonzero = functools.reduce(jnp.add, [(x != 0).astype(jnp.int32) for x in xs])
    # Counted per layer so no int32 sum covers more than one layer's elements.
    conflicts = jnp.sum(pos & neg, axis=axes, dtype=jnp.int32)  # (L,)
    compared = jnp.sum(nonzero >= 2, axis=axes, dtype=jnp.int32)  # (L,)
    return sq, dots, conflicts, compared


def vector_diagnostics(vectors: list[Vector], names: list[str] | None = None) -> dict[str, Any]:
    """Norms, cosine similarities and sign conflicts of distribution vectors.

    * ``norms[name]``: ``total`` L2 norm; ``layers``: L2 norm of each decoder layer
      (all its parameters); ``groups``: L2 norm of each parameter group (HF name
      without the layer prefix, e.g. ``self_attn.q_proj.weight``, summed over layers).
    * ``cosine``: N × N matrix of cosine similarities over all parameters
      (0 where a vector is all zeros).
    * ``sign_conflict``: an element is *compared* where at least two vectors are
      non-zero, and *conflicting* where among those some are positive and some
      negative; ``rate`` = conflicting / compared (``None`` when nothing is
      compared, e.g. for one vector), overall and per group.

    Computed leaf by leaf under jit on the vectors' shardings; only scalars and
    per-layer sums come back to the host.
    """
    if not vectors:
        raise DemError("vector_diagnostics: no vectors given")
    names = list(names or [v.name or f"vector{i}" for i, v in enumerate(vectors)])
    if len(names) != len(vectors) or len(set(names)) != len(names):
        raise DemError(f"vector_diagnostics: need one distinct name per vector, got {names}")
    ref = vectors[0].config
    for name, v in zip(names[1:], vectors[1:], strict=True):
        check_compatible(ref, v.config, names[0], name)

    n, n_layers = len(vectors), ref.num_layers
    layer_sq = np.zeros((n, n_layers))
    group_sq: dict[str, np.ndarray] = {}
    dots = np.zeros((n, n))
    group_conf: dict[str, list[int]] = {}
    for tmap in tensor_maps(ref):
        leaves = [get_leaf(v.params, tmap.path) for v in vectors]
        if not tmap.stacked:
            leaves = [a[None] for a in leaves]
        sq, d, conf, comp = jax.device_get(_leaf_stats(leaves))
        sq = np.asarray(sq, np.float64)
        if tmap.stacked:
            layer_sq += sq
        group_sq[group_name(tmap)] = sq.sum(axis=1)
        dots += np.asarray(d, np.float64)
        group_conf[group_name(tmap)] = [
            int(np.sum(conf, dtype=np.int64)),
            int(np.sum(comp, dtype=np.int64)),
        ]

    total_sq = np.diag(dots)
    norms = np.sqrt(total_sq)
    denom = np.outer(norms, norms)
    cosine = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    conflicting = sum(c for c, _ in group_conf.values())
    compared = sum(c for _, c in group_conf.values())

    def rate(c: int, m: int) -> float | None:
        return c / m if m else None

    return {
        "names": names,
        "num_params": int(
            sum(math.prod(get_leaf(vectors[0].params, tm.path).shape) for tm in tensor_maps(ref))
        ),
        "norms": {
            name: {
                "total": float(norms[i]),
                "layers": [float(x) for x in np.sqrt(layer_sq[i])],
                "groups": {g: float(np.sqrt(s[i])) for g, s in group_sq.items()},
            }
            for i, name in enumerate(names)
        },
        "cosine": [[float(x) for x in row] for row in cosine],
        "sign_conflict": {
            "rate": rate(conflicting, compared),
            "conflicting": conflicting,
            "compared": compared,
            "groups": {g: rate(c, m) for g, (c, m) in group_conf.items()},
        },
    }


def format_diagnostics(diag: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`vector_diagnostics`' result."""
    names = diag["names"]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'vector':<{width}}  {'L2 norm':>10}  per-layer L2 norms"]
    for name in names:
        entry = diag["norms"][name]
        layers = " ".join(f"{x:.3g}" for x in entry["layers"])
        lines.append(f"{name:<{width}}  {entry['total']:>10.4g}  {layers}")
    lines.append("cosine similarity:")
    lines.append(" " * width + "  " + " ".join(f"{n[:8]:>8}" for n in names))
    for name, row in zip(names, diag["cosine"], strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{x:>8.4f}" for x in row))
    sc = diag["sign_conflict"]
    if sc["rate"] is None:
        lines.append("sign conflicts: none compared (need two non-zero vectors)")
    else:
        lines.append(
            f"sign conflicts: {sc['rate']:.4f} ({sc['conflicting']} of {sc['compared']} "
            "elements where two or more vectors are non-zero)"
        )
    return "\n".join(lines)
