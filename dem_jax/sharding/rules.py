"""Device meshes and the logical-axis rules that place parameters on them.

Every parameter carries logical axis names (see :mod:`dem_jax.model`); one
table, :data:`PARAM_RULES`, maps each name onto a mesh axis. The mesh has
four axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
with parameters and optimizer state sharded), ``expert`` (a mixture of
experts' experts split over devices, batches too, as MaxText's expert
parallelism; size 1 for dense models) and ``tensor`` (tensor parallelism over
heads, MLP width and vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.model.transformer import param_axes, param_shapes

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (None: replicated). Parameters shard the model
# width over fsdp and the "wide" dimensions over tensor, as MaxText does.
PARAM_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    # Phi-3's fused q/k/v heads: a tensor split would not fall on the q|k|v bounds.
    "qkv_heads": None,
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "experts": "expert",  # MoE: each device holds its experts (Mixtral, Qwen3-MoE)
    "router": None,  # the router's expert logits: small, every device needs them all
}

# Batches are split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp", "expert")


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    expert: int = 1,
) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh; one size may be -1 to take the remaining
    devices.

    With every size given and fewer devices asked for than exist, the first
    devices are used (e.g. a one-device mesh for comparisons).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, expert, tensor]
    if -1 not in sizes and 0 < math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    if sizes.count(-1) > 1:
        raise DemError("mesh: at most one of data/fsdp/expert/tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise DemError(
            f"mesh: sizes data={data} fsdp={fsdp} expert={expert} tensor={tensor} do not fit "
            f"{len(devices)} devices"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise DemError(
            f"mesh: data*fsdp*expert*tensor = {math.prod(sizes)} but there are "
            f"{len(devices)} devices"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = PARAM_RULES,
) -> PartitionSpec:
    """The PartitionSpec for one array.

    A dimension that the mapped mesh axis does not divide evenly stays
    replicated (e.g. one KV head under tensor=4), and a mesh axis is used at
    most once per array.
    """
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise DemError(f"sharding: no rule for logical axis {name!r}")
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis if mesh.shape[mesh_axis] > 1 else None)
    return PartitionSpec(*spec)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    """NamedShardings for a tree of arrays given a matching tree of logical axes."""
    return jax.tree.map(
        lambda axes, s: NamedSharding(mesh, logical_to_spec(axes, s.shape, mesh, rules)),
        axes_tree,
        shapes_tree,
        is_leaf=_is_axes,
    )


def param_shardings(config: ModelConfig, mesh: Mesh | None = None) -> Any:
    """Where each parameter of a model lives: by the rules on ``mesh``, or on the
    default device when there is no mesh."""
    shapes = param_shapes(config)
    if mesh is None:
        return single_device_sharding(shapes)
    return tree_shardings(param_axes(config), shapes, mesh)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a (B, T, ...) batch: B split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def single_device_sharding(tree: Any) -> Any:
    """The default device's sharding for every leaf of a tree (no mesh)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: sharding, tree)
