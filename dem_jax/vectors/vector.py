"""Distribution vectors ΔΘ_i = Θ_i − Θ (the math; storage is :mod:`dem_jax.vectors.store`).

A vector is a float32 parameter pytree laid out like the model's (layers
stacked on a leading axis, tied embeddings stored once). It is computed under
``jax.jit`` with the parameters' own shardings, so a vector of a model spread
over a mesh never gathers on one host.

    vec = distribution_vector(base, finetuned, name="code")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io.hf.weights import TensorMap, tensor_maps
from dem_jax.io.modeldir import Model
from dem_jax.io.tree import get_leaf
from dem_jax.model.transformer import param_shapes

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
