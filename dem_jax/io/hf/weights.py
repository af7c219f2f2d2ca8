"""Hugging Face tensor names ⇄ dem-jax parameters.

The key map is explicit (one :class:`TensorMap` per parameter) and every
layout change is a transpose plus a reshape, so conversion is exact in both
directions. Loading reads one tensor block at a time from the safetensors
files and places it straight onto its device shard with
``jax.make_array_from_callback``: each device reads only its own slice (of
each layer), so a model larger than one device's memory loads onto a mesh.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint
from dem_jax.io.hf.safetensors_writer import TensorSpec
from dem_jax.lazy import LazyModule, jax

# the model's shapes (flax) only when a checkpoint is read or written
transformer = LazyModule("dem_jax.model.transformer")

# Tensors some checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorMap:
    """How one dem-jax parameter is stored in a Hugging Face checkpoint.

    The HF tensor, transposed if ``transpose``, is a matrix whose rows
    flatten our first ``split`` (per-layer) dimensions and whose columns
    flatten the rest (a vector when ``split`` covers every dimension).
    """

    path: tuple[str, ...]  # key path in the params dict
    hf_name: str  # contains "{i}" for per-layer tensors, and "{j}" per expert
    transpose: bool
    split: int

    @property
    def stacked(self) -> bool:
        """Whether the leaf has a leading layers axis (one HF tensor per layer)."""
        return "{i}" in self.hf_name

    @property
    def depth(self) -> int:
        """How many leading axes index HF tensors: layers, then experts (MoE)."""
        return ("{i}" in self.hf_name) + ("{j}" in self.hf_name)


# Each placement's layer norms: (our module, HF name). Llama's post_attention_layernorm
# is the MLP's pre-norm; OLMo 2's and Gemma's is attention's post-norm.
_LAYER_NORMS = {
    "pre": (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")),
    "post": (
        ("post_attn_norm", "post_attention_layernorm"),
        ("post_mlp_norm", "post_feedforward_layernorm"),
    ),
    "sandwich": (
        ("attn_norm", "input_layernorm"),
        ("post_attn_norm", "post_attention_layernorm"),
        ("mlp_norm", "pre_feedforward_layernorm"),
        ("post_mlp_norm", "post_feedforward_layernorm"),
    ),
}


def _attention_maps(config: ModelConfig, layer: str) -> list[TensorMap]:
    projections = ["qkv_proj"] if config.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    maps = []
    for proj in [*projections, "o_proj"]:
        is_o = proj == "o_proj"
        # (our leaf, HF suffix, transpose, split) of the projection's kernel and bias
        parts = [("kernel", "weight", True, 2 if is_o else 1)]
        if config.o_bias if is_o else config.qkv_bias:
            parts.append(("bias", "bias", False, 1 if is_o else 2))
        maps += [
            TensorMap(("layers", "attn", proj, leaf), f"{layer}self_attn.{proj}.{hf}", t, split)
            for leaf, hf, t, split in parts
        ]
    if config.qk_norm is not None:
        maps += [
            TensorMap(("layers", "attn", n, "scale"), f"{layer}self_attn.{n}.weight", False, 1)
            for n in ("q_norm", "k_norm")
        ]
    return maps


def _mlp_maps(config: ModelConfig, layer: str) -> list[TensorMap]:
    projections = ["gate_up_proj"] if config.fused_gate_up else ["gate_proj", "up_proj"]
    return [
        TensorMap(("layers", "mlp", p, "kernel"), f"{layer}mlp.{p}.weight", True, 1)
        for p in [*projections, "down_proj"]
    ]


# Each MoE family's names: the router, then our expert kernel -> its HF name.
_MOE_NAMES = {
    "mixtral": (
        "block_sparse_moe.gate",
        {
            "gate_proj": "block_sparse_moe.experts.{j}.w1",
            "up_proj": "block_sparse_moe.experts.{j}.w3",
            "down_proj": "block_sparse_moe.experts.{j}.w2",
        },
    ),
    "qwen3_moe": (
        "mlp.gate",
        {p: f"mlp.experts.{{j}}.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
    ),
}


def _moe_maps(config: ModelConfig, layer: str) -> list[TensorMap]:
    """The router (D, E) and each expert's kernels, one HF tensor per layer and expert."""
    router, experts = _MOE_NAMES[config.architecture]
    maps = [TensorMap(("layers", "mlp", "router"), f"{layer}{router}.weight", True, 1)]
    maps += [
        TensorMap(("layers", "mlp", ours), f"{layer}{hf}.weight", True, 1)
        for ours, hf in experts.items()
    ]
    return maps


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """The key map for a config, in the order tensors are exported."""
    layer = "model.layers.{i}."
    maps = [TensorMap(("embed", "embedding"), "model.embed_tokens.weight", False, 1)]
    maps += _attention_maps(config, layer)
    maps += _moe_maps(config, layer) if config.num_experts else _mlp_maps(config, layer)
    maps += [
        TensorMap(("layers", ours, "scale"), f"{layer}{hf}.weight", False, 1)
        for ours, hf in _LAYER_NORMS[config.norm_placement]
    ]
    maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", False, 1))
    if not config.tie_embeddings:
        maps.append(TensorMap(("lm_head", "kernel"), "lm_head.weight", True, 1))
    return maps


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _hf_shape(tmap: TensorMap, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor behind one layer's slice of a parameter."""
    rows = math.prod(our_shape[: tmap.split])
    if tmap.split == len(our_shape):
        return (rows,)
    cols = math.prod(our_shape[tmap.split :])
    return (cols, rows) if tmap.transpose else (rows, cols)


def _layer_shape(tmap: TensorMap, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[tmap.depth :]


def tensor_names(tmap: TensorMap, layers: Sequence[int], experts: Sequence[int]) -> list[str]:
    """The HF tensors behind ``layers`` of one leaf (and ``experts`` of each, for an
    expert kernel), in the order of its flattened leading axes: layer-major."""
    if not tmap.stacked:
        return [tmap.hf_name]
    experts = experts if "{j}" in tmap.hf_name else (0,)
    return [tmap.hf_name.format(i=i, j=j) for i in layers for j in experts]


def hf_names(tmap: TensorMap, config: ModelConfig) -> list[str]:
    """The HF tensors behind one whole leaf (see :func:`tensor_names`)."""
    return tensor_names(tmap, range(config.num_layers), range(config.num_experts))


def block_tensors(
    tmap: TensorMap, shape: tuple[int, ...], index: tuple, first: int = 0
) -> tuple[tuple[int, ...], list[str], tuple]:
    """A device's block ``index`` of a stacked leaf of ``shape``: how many layers (and
    experts) it spans, the HF tensor behind each of them (layer-major; the leaf's
    layer 0 is the model's layer ``first``) and the block's index within one tensor."""
    depth = tmap.depth
    lead = [range(*s.indices(n)) for s, n in zip(index[:depth], shape[:depth], strict=True)]
    layers = [first + i for i in lead[0]]
    names = tensor_names(tmap, layers, lead[1] if depth > 1 else (0,))
    return tuple(map(len, lead)), names, index[depth:]


def per_tensor(leaf, tmap: TensorMap):
    """A leaf viewed as (number of HF tensors, *one tensor's shape in our layout)."""
    return leaf.reshape(-1, *leaf.shape[tmap.depth :]) if tmap.depth else leaf[None]


def check_checkpoint(ckpt: SafetensorsCheckpoint, config: ModelConfig, where: str) -> None:
    """Every expected tensor present with the expected shape, and nothing unexpected."""
    shapes = transformer.param_shapes(config)
    expected: set[str] = set()
    for tmap in tensor_maps(config):
        hf_shape = _hf_shape(tmap, _layer_shape(tmap, _get(shapes, tmap.path).shape))
        for name in hf_names(tmap, config):
            expected.add(name)
            if name not in ckpt:
                raise DemError(f"{where}: missing tensor {name}")
            found = tuple(ckpt.shape(name))
            if found != hf_shape:
                hint = ""
                if name == "model.embed_tokens.weight" and found[1:] == hf_shape[1:]:
                    hint = f" (vocab mismatch: config.json vocab_size is {config.vocab_size})"
                raise DemError(
                    f"{where}: tensor {name} has shape {list(found)}, expected "
                    f"{list(hf_shape)}{hint}"
                )
    if config.tie_embeddings:
        expected.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    extra = sorted(k for k in ckpt if k not in expected and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DemError(
            f"{where}: unexpected tensor {extra[0]}{more} for a {config.architecture} model"
        )


def _read_block(ckpt, tmap: TensorMap, name: str, shape: tuple[int, ...], index) -> np.ndarray:
    """Our-layout block ``index`` (slices over ``shape``) of one HF tensor, reading
    only the rows/columns that cover it."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
    a_dims, b_dims = shape[: tmap.split], shape[tmap.split :]
    a0 = index[0]
    a_inner = math.prod(a_dims[1:])
    rows = slice(a0.start * a_inner, a0.stop * a_inner)
    block_shape = [a0.stop - a0.start, *a_dims[1:]]
    rest = [slice(None), *index[1 : tmap.split]]
    if b_dims:
        b0 = index[tmap.split]
        b_inner = math.prod(b_dims[1:])
        cols = slice(b0.start * b_inner, b0.stop * b_inner)
        hf_index = (cols, rows) if tmap.transpose else (rows, cols)
        block = ckpt.read(name, hf_index)
        block = block.T if tmap.transpose else block
        block_shape += [b0.stop - b0.start, *b_dims[1:]]
        rest += [slice(None), *index[tmap.split + 1 :]]
    else:
        block = ckpt.read(name, (rows,))
    return block.reshape(block_shape)[tuple(rest)]


def read_params(
    ckpt: SafetensorsCheckpoint, config: ModelConfig, shardings: dict[str, Any]
) -> dict[str, Any]:
    """Load every parameter onto its sharding, cast to ``config.param_dtype``."""
    shapes = transformer.param_shapes(config)
    params: dict[str, Any] = {}
    for tmap in tensor_maps(config):
        spec = _get(shapes, tmap.path)
        target = np.dtype(spec.dtype)

        def callback(index, tmap=tmap, shape=tuple(spec.shape), target=target):
            if not tmap.depth:
                return _read_block(ckpt, tmap, tmap.hf_name, shape, index).astype(
                    target, copy=False
                )
            # one block per (layer[, expert]) this device holds
            counts, names, inner = block_tensors(tmap, shape, index)
            block = np.stack(
                [_read_block(ckpt, tmap, n, shape[tmap.depth :], inner) for n in names]
            )
            return block.reshape(*counts, *block.shape[1:]).astype(target, copy=False)

        array = jax.make_array_from_callback(
            tuple(spec.shape), _get(shardings, tmap.path), callback
        )
        _set(params, tmap.path, array)
    return params


def hf_tensor_specs(config: ModelConfig, dtype: np.dtype) -> list[TensorSpec]:
    """Name, shape and dtype of every exported tensor, in export order."""
    shapes = transformer.param_shapes(config)
    specs = []
    for tmap in tensor_maps(config):
        hf_shape = _hf_shape(tmap, _layer_shape(tmap, _get(shapes, tmap.path).shape))
        specs += [TensorSpec(n, hf_shape, np.dtype(dtype)) for n in hf_names(tmap, config)]
    return specs


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host, also when it is sharded across processes."""
    if not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def iter_hf_tensors(
    params: dict[str, Any], config: ModelConfig, dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every HF tensor in export order; one parameter on the host at a time."""
    for tmap in tensor_maps(config):
        leaf = _to_host(_get(params, tmap.path)).astype(dtype, copy=False)
        layers = per_tensor(leaf, tmap)
        for name, layer in zip(hf_names(tmap, config), layers, strict=True):
            rows = math.prod(layer.shape[: tmap.split])
            matrix = layer.reshape(rows, -1) if tmap.split < layer.ndim else layer.reshape(rows)
            yield name, np.ascontiguousarray(matrix.T if tmap.transpose else matrix)
        del leaf, layers
