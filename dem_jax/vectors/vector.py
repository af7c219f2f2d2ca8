"""Distribution vectors ΔΘ_i = Θ_i − Θ (the math; storage is :mod:`dem_jax.vectors.store`).

A vector is a float32 parameter pytree laid out like the model's (layers
stacked on a leading axis, tied embeddings stored once). It is computed under
``jax.jit`` with the parameters' own shardings, so a vector of a model spread
over a mesh never gathers on one host.

    vec = distribution_vector(base, finetuned, name="code")
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.weights import TensorMap, tensor_maps
from dem_jax.io.modeldir import Model
from dem_jax.io.tree import get_leaf
from dem_jax.model.transformer import param_shapes
from dem_jax.sharding.distributed import is_main_process

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


def group_name(tmap: TensorMap) -> str:
    """Parameter-group name of a leaf: its Hugging Face name without the layer prefix
    (``self_attn.q_proj.weight``, ``model.embed_tokens.weight``)."""
    return tmap.hf_name.removeprefix(_LAYER_PREFIX)


def describe(tmap: TensorMap) -> str:
    """A leaf as users know it: HF name (``*`` for the layer index) and our path."""
    return f"{tmap.hf_name.replace('{i}', '*')} ({'.'.join(tmap.path)})"


def check_compatible(
    ref: ModelConfig,
    other: ModelConfig,
    ref_name: str,
    other_name: str,
    allow_crimes: bool | None = None,
) -> None:
    """DemError naming ``other_name`` and the parameter unless both configs have the same
    architecture and every parameter the same shape (dtypes may differ).

    ``allow_crimes`` (mergekit's ``--allow-crimes``): True lets the architectures differ
    where every parameter has the same shape and Hugging Face tensor; False refuses
    and names the flag; None (callers without such a flag) refuses."""
    if ref.architecture != other.architecture and not allow_crimes:
        hint = (
            " (--allow-crimes merges them if every tensor agrees)" if allow_crimes is False else ""
        )
        raise DemError(
            f"{other_name}: architecture {other.architecture!r} does not match "
            f"{ref_name} ({ref.architecture!r}){hint}"
        )
    if ref.num_experts != other.num_experts:
        raise DemError(
            f"{other_name}: has {other.num_experts} experts per layer, {ref_name} has "
            f"{ref.num_experts} (mixtures of experts merge expert by expert: the counts must match)"
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
        if other_maps[path] != tmap:  # same leaf, another HF tensor (architectures differ)
            raise DemError(
                f"{other_name}: parameter {describe(other_maps[path])} is stored as "
                f"{describe(tmap)} in {ref_name}"
            )
    for path, tmap in other_maps.items():
        if path not in ref_maps:
            raise DemError(f"{other_name}: has parameter {describe(tmap)}, {ref_name} has not")


def recorded_bases(finetuned: Model, model_path: str | os.PathLike | None) -> list[str]:
    """Where a dem-jax training run's metadata says ``finetuned`` started from (its
    ``base``, and ``base_relative`` resolved from ``model_path``); empty for models
    that do not say (Hugging Face models, merges, older dem-jax models)."""
    meta = finetuned.metadata or {}
    if "trained_on" not in meta or "base" not in meta:
        return []
    if any(k in meta for k in ("dem", "merge", "baseline")):  # a merge copies its base's
        return []
    found = [str(meta["base"])]
    if meta.get("base_relative") and model_path is not None and not storage.is_url(model_path):
        found.append(os.path.join(storage.absolute(model_path), meta["base_relative"]))
    return found


def _same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def other_base_warning(
    finetuned: Model,
    base_path: str | os.PathLike | None,
    model_path: str | os.PathLike | None,
    label: str,
) -> str | None:
    """One warning line when ``finetuned``'s metadata say it was trained from another
    model than ``base_path`` (its vector would then mix in the difference of the two
    bases), else None."""
    recorded = recorded_bases(finetuned, model_path)
    if base_path is None or not recorded or any(_same_place(base_path, r) for r in recorded):
        return None
    return (
        f"warning: {label} was fine-tuned from {recorded[0]}, not from the base given "
        f"({base_path}); its vector is measured from a model it was not trained from"
    )


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
    warning = other_base_warning(finetuned, base_path, model_path, label)
    if warning is not None and is_main_process():
        print(warning, file=sys.stderr, flush=True)
    shardings = jax.tree.map(lambda x: x.sharding, base.params)
    params = jax.jit(_subtract, out_shardings=shardings)(finetuned.params, base.params)
    return Vector(
        _f32_config(base.config),
        params,
        name=name,
        base_path=None if base_path is None else str(base_path),
        model_path=None if model_path is None else str(model_path),
    )
