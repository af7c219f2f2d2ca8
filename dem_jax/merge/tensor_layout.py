"""How a leaf (one parameter, all decoder layers stacked) maps onto the Hugging Face
tensors mergekit merges one at a time: per-layer names, gradient positions, and the
(rows, columns) view in which whole-tensor statistics are taken."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dem_jax.io.hf.weights import TensorMap, tensor_names
from dem_jax.lazy import jax, jnp


@dataclass(frozen=True)
class Layout:
    """How one leaf maps onto Hugging Face tensors (see ``dem_jax.io.hf.weights.TensorMap``)."""

    stacked: bool  # leading layers axis: one HF tensor per layer
    split: int  # per-layer dims that flatten into the HF matrix's rows (ours)
    transpose: bool  # the HF tensor is that matrix transposed
    depth: int = 1  # leading axes that index HF tensors: layers (, experts)

    @classmethod
    def of(cls, tmap: TensorMap) -> Layout:
        """The layout of one key-map entry."""
        return cls(tmap.stacked, tmap.split, tmap.transpose, tmap.depth)


def layer_names_and_ts(
    tmap: TensorMap, num_layers: int, num_experts: int = 0, first: int = 0
) -> tuple[list[str], list[float]]:
    """HF tensor name and gradient position ``t`` of each layer (and, for a mixture
    of experts' expert kernels, each expert of each layer, layer-major) of a leaf
    holding layers ``first .. first + num_layers - 1`` (mergekit: ``t = k / (n - 1)``
    over the n layers of the model or of its output slice, 1 for a single layer, the
    same for every expert of a layer; embeddings, final norm and lm_head ``t = 0``)."""
    if not tmap.stacked:
        return [tmap.hf_name], [0.0]
    ts = [k / (num_layers - 1) if num_layers > 1 else 1.0 for k in range(num_layers)]
    names = tensor_names(tmap, range(first, first + num_layers), range(num_experts))
    per_layer = len(names) // num_layers  # experts per layer (1 for other leaves)
    return names, [t for t in ts for _ in range(per_layer)]


def to_hf(x: jax.Array, layout: Layout, lead: int) -> jax.Array:
    """(*lead, *layer_shape) -> (*lead, *hf_shape): the HF tensor of each layer."""
    pre, shape = x.shape[:lead], x.shape[lead:]
    rows = math.prod(shape[: layout.split])
    if layout.split >= len(shape):
        return x.reshape(*pre, rows)
    m = x.reshape(*pre, rows, -1)
    return jnp.swapaxes(m, -1, -2) if layout.transpose else m


def from_hf(m: jax.Array, layout: Layout, shape: tuple[int, ...], lead: int) -> jax.Array:
    """Inverse of :func:`to_hf`; ``shape`` is the full (*lead, *layer_shape)."""
    if layout.transpose and layout.split < len(shape) - lead:  # a transposed matrix
        m = jnp.swapaxes(m, -1, -2)
    return m.reshape(shape)
