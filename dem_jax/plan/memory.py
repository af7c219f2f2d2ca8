"""Will a run config fit on a TPU slice? A per-device memory plan, without weights.

    dem-jax plan configs/tpu/openllama-7b-v4-32.yaml
    dem-jax plan my.yaml --slice v5p-32 --model-config openllama-7b train.grad_accum=4

Everything is counted per device (one JAX device: a chip on v4, v5e, v5p and
v6e, a TensorCore on v2/v3) and follows the trainer in :mod:`dem_jax.train`:

* **Parameters** in ``train.param_dtype``, each one sharded by the real rules
  of :mod:`dem_jax.sharding` (width over ``fsdp``; heads, MLP width and
  vocabulary over ``tensor``; a dimension the axis does not divide stays
  replicated). ``train.param_dtype`` *is* the master copy: there is no second
  float32 copy.
* **AdamW moments**: two per parameter in the parameters' dtype (``optax.adamw``
  with its default ``mu_dtype``, see :mod:`dem_jax.train.optimizer`), sharded
  like the parameters.
* **Gradients**: one per parameter in the parameters' dtype, plus the
  accumulator when ``train.grad_accum > 1``.
* **Gathered weights** (transient): FSDP all-gathers a layer's weights before
  using them; two layers at once (the one in use and the next, prefetched),
  plus the embedding and output matrices, in ``train.compute_dtype``, each still
  split over ``tensor``.
* **Activations** for one micro-batch of ``b = batch_size / grad_accum /
  (data × fsdp × expert)`` rows of ``T = data.seq_len`` tokens per device, ``c``
  bytes per compute-dtype element, ``H, K, F, V`` divided by ``tensor`` where it
  divides them; a mixture of experts' ``F`` is its local experts' widths added up
  (every expert runs on every token) plus the router's logits. The attention is
  materialised (see :mod:`dem_jax.model`), so what one decoder layer keeps for its
  backward pass is::

      A_layer = b·T·(D·(4c + 8) + (H + 2K)·Dh·c + H·Dh·c + 5·F·c) + b·T·T·H·(5 + c)

  (the residual; each RMSNorm's float32 input and its output; q, k, v; the
  attention output; gate, sigmoid(gate), silu(gate), up and their product;
  per attention score the float32 softmax, the compute-dtype probabilities and
  the boolean mask). The loss head keeps ``A_head = b·T·(D·(4 + c) + V·(c + 8))``
  (final norm; logits in the compute dtype and in float32; the float32
  softmax) while the logits are small; past ``CHUNK_ELEMENTS`` the loss is
  chunked (:func:`dem_jax.model.losses.chunked_nll_sum`) and keeps
  ``b·T·D·(4 + 2c) + 4·D·V + b·C·V·(c + 4)`` (the final norm and ∂hidden, the
  float32 ∂kernel, and one chunk of C positions' logits with one float32 buffer
  for their softmax and gradient). Without remat each layer keeps only its input
  and the outputs of its weight matmuls for the backward pass (the rest of the
  layer is recomputed there, see :mod:`dem_jax.model.transformer`)::

      S_layer = b·T·(2·D + (H + 2K)·Dh + 2·F)·c   (input, q, k, v, o_proj, gate, up)

  In total::

      without remat:  L·S_layer + (A_layer - S_layer) + A_head   (saved; one layer in flight)
      with remat:     L·b·T·D·c + A_layer + A_head   (layer inputs; one layer recomputed)

  tests/test_plan.py compiles the real train step and checks the whole plan
  against XLA's own buffer assignment: it lands at or up to ~20% above it.

The plan fits when the sum stays under ``1 - RESERVE`` of the device's HBM;
the reserve covers XLA scratch space, fragmentation and the runtime.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import AbstractMesh

from dem_jax.config.loader import load_run_config
from dem_jax.config.model import ModelConfig
from dem_jax.config.run import MeshConfig, TrainConfig
from dem_jax.errors import DemError
from dem_jax.model.losses import chunk_length
from dem_jax.model.transformer import param_axes, param_shapes
from dem_jax.plan.architectures import resolve_model_config
from dem_jax.plan.tpu import GiB, TpuSlice, resolve_slice
from dem_jax.sharding.rules import MESH_AXES, logical_to_spec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESERVE = 0.10  # fraction of HBM kept back for XLA scratch, fragmentation and the runtime


def resolve_mesh(mesh: MeshConfig, devices: int) -> dict[str, int]:
    """Mesh axis sizes on ``devices`` devices, with one -1 taking the rest (as make_mesh)."""
    sizes = {a: getattr(mesh, a) for a in MESH_AXES}
    if list(sizes.values()).count(-1) > 1:
        raise DemError("mesh: at most one of data/fsdp/expert/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise DemError(f"mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if devices % known:
        raise DemError(f"mesh: data×fsdp×expert×tensor = {known} does not divide {devices} devices")
    sizes = {a: devices // known if s == -1 else s for a, s in sizes.items()}
    if math.prod(sizes.values()) != devices:
        raise DemError(
            f"mesh: data×fsdp×expert×tensor = {math.prod(sizes.values())} but the slice has "
            f"{devices} devices"
        )
    return sizes


def sharded_param_elements(config: ModelConfig, mesh: dict[str, int]) -> dict[str, int]:
    """Parameter elements: in total, per device, and per device of one layer and of
    the embedding/output matrices once all-gathered over fsdp (tensor split kept)."""

    mesh = {"expert": 1, **mesh}  # dense models' plans may leave the expert axis out
    full = AbstractMesh(tuple(mesh[a] for a in MESH_AXES), MESH_AXES)
    # experts stay split when a layer is gathered over fsdp (as the tensor split does)
    tensor_only = AbstractMesh((1, 1, mesh["expert"], mesh["tensor"]), MESH_AXES)

    def local(axes, shape, m) -> int:
        spec = logical_to_spec(axes, shape, m)
        return math.prod(n // (m.shape[s] if s else 1) for n, s in zip(shape, spec, strict=True))

    def is_axes(x) -> bool:
        return isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)

    axes = jax.tree.leaves(param_axes(config), is_leaf=is_axes)
    shapes = [tuple(s.shape) for s in jax.tree.leaves(param_shapes(config))]
    leaves = list(zip(axes, shapes, strict=True))
    layer = sum(local(a, s, tensor_only) for a, s in leaves if a[0] == "layers")
    return {
        "total": sum(math.prod(s) for _, s in leaves),
        "per_device": sum(local(a, s, full) for a, s in leaves),
        "layer_gathered": layer // config.num_layers,
        "vocab_gathered": sum(local(a, s, tensor_only) for a, s in leaves if "vocab" in a),
    }


def activation_bytes(
    config: ModelConfig,
    rows: int,
    seq_len: int,
    compute_dtype: str,
    tensor: int,
    remat: bool,
    expert: int = 1,
) -> dict[str, int]:
    """Activation bytes per device for ``rows`` rows of ``seq_len`` tokens (module docstring)."""
    b, t, c = rows, seq_len, DTYPE_BYTES[compute_dtype]

    def split(n: int) -> int:  # as the parameter rules: split over tensor only if it divides
        return n // tensor if n % tensor == 0 else n

    d, dh, layers = config.hidden_size, config.head_dim, config.num_layers
    h, k = split(config.num_heads), split(config.num_kv_heads)
    f, v = split(config.intermediate_size), split(config.vocab_size)
    if config.num_experts:  # every local expert on every token (dem_jax.model.moe)
        e = config.num_experts
        local = e // expert if e % expert == 0 else e
        f = local * split(config.expert_size) + e
    per_token = d * (4 * c + 8) + (h + 2 * k) * dh * c + h * dh * c + 5 * f * c
    layer = b * t * per_token + b * t * t * h * (4 + c + 1)
    # Past CHUNK_ELEMENTS logits the loss takes a chunk of positions at a time and
    # forms its gradients in the same pass (dem_jax.model.losses).
    chunk = chunk_length(b, t, config.vocab_size)
    if chunk >= t:
        head = b * t * (d * (4 + c) + v * (c + 8))
    else:
        head = b * t * d * (4 + 2 * c) + d * v * 4 + b * chunk * v * (c + 4)
    if remat:
        saved, working = layers * b * t * d * c, layer
    else:  # the layer in flight already has its matmul outputs among the saved ones
        kept = b * t * (2 * d + (h + 2 * k) * dh + 2 * f) * c
        saved, working = layers * kept, layer - kept
    total = saved + working + head
    return {"layer": layer, "saved": saved, "working": working, "head": head, "total": total}


@dataclass
class MemoryPlan:
    """Bytes per device of one training run on one slice."""

    config_path: str
    model: ModelConfig
    model_source: str  # where the architecture came from
    slice: TpuSlice
    mesh: dict[str, int]
    train: TrainConfig
    seq_len: int
    rows_per_device: int  # micro-batch rows on each device
    num_params: int
    params_per_device: int  # parameter elements on each device
    parts: dict[str, int]  # component -> bytes per device
    activations: dict[str, int]  # activation_bytes() breakdown

    @property
    def total(self) -> int:
        """Bytes per device."""
        return sum(self.parts.values())

    @property
    def usable(self) -> int:
        """HBM bytes per device the plan may use."""
        return int(self.slice.hbm_per_device * (1 - RESERVE))

    @property
    def fits(self) -> bool:
        """Whether the total stays within the usable HBM."""
        return self.total <= self.usable

    def hints(self) -> list[str]:
        """What would shrink the plan, cheapest first."""
        out = []
        if not self.train.remat:
            out.append("train.remat=true")
        if self.rows_per_device > 1:
            out.append(
                f"a larger train.grad_accum ({self.rows_per_device} rows per device "
                "per micro-batch now)"
            )
        if self.mesh["fsdp"] * self.mesh["expert"] * self.mesh["tensor"] < self.slice.devices:
            out.append("mesh.fsdp=-1 (shard parameters and optimizer state over every device)")
        out.append("a larger slice")
        return out

    def verdict(self) -> str:
        """One line: fits or not, by how much, and what would help."""
        need, have = self.total / GiB, self.usable / GiB
        where = (
            f"{need:.2f} GiB per device of {have:.2f} GiB usable on {self.slice.accelerator_type}"
        )
        if self.fits:
            return f"fits: {where}"
        return f"does not fit: {where}; try {'; or '.join(self.hints())}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (bytes are per device)."""
        return {
            "config": self.config_path,
            "model": {
                "source": self.model_source,
                "num_params": self.num_params,
                **self.model.to_dict(),
            },
            "slice": {
                "accelerator_type": self.slice.accelerator_type,
                "chips": self.slice.chips,
                "devices": self.slice.devices,
                "hosts": self.slice.hosts,
                "hbm_per_device": self.slice.hbm_per_device,
            },
            "mesh": self.mesh,
            "batch": {
                "batch_size": self.train.batch_size,
                "grad_accum": self.train.grad_accum,
                "seq_len": self.seq_len,
                "rows_per_device": self.rows_per_device,
            },
            "dtypes": {"param": self.train.param_dtype, "compute": self.train.compute_dtype},
            "remat": self.train.remat,
            "params_per_device": self.params_per_device,
            "bytes_per_device": dict(self.parts),
            "activations": dict(self.activations),
            "total": self.total,
            "usable": self.usable,
            "reserve": RESERVE,
            "fits": self.fits,
        }

    def format_table(self) -> str:
        """The plan as a human-readable table."""
        m, s, t = self.model, self.slice, self.train
        pd, cd = t.param_dtype, t.compute_dtype
        lines = [
            f"config   {self.config_path}",
            f"model    {self.model_source}: {self.num_params / 1e9:.2f}B params, "
            f"{m.num_layers} layers, D={m.hidden_size} F={m.expert_size} "
            f"H={m.num_heads} K={m.num_kv_heads} V={m.vocab_size}"
            + (f", {m.num_experts} experts (top {m.experts_per_token})" if m.num_experts else ""),
            f"slice    {s.accelerator_type}: {s.chips} chips, {s.devices} devices, "
            f"{s.hosts} host{'s' * (s.hosts > 1)}, {s.hbm_per_device / GiB:.0f} GiB HBM per device",
            "mesh     " + " ".join(f"{a}={n}" for a, n in self.mesh.items()),
            f"batch    {t.batch_size} rows × {self.seq_len} tokens, grad_accum {t.grad_accum}"
            f" -> {self.rows_per_device} rows per device per micro-batch",
            f"dtypes   params {pd}, compute {cd}, remat {'on' if t.remat else 'off'}",
            "",
            f"{'per device':<40}{'GiB':>9}",
        ]
        labels = {
            "params": f"parameters ({pd})",
            "optimizer": f"AdamW moments (2 × {pd})",
            "gradients": f"gradients ({pd})",
            "grad_accum": f"gradient accumulator ({pd})",
            "gathered": f"gathered weights ({cd}, transient)",
            "activations": f"activations ({'remat' if t.remat else 'no remat'})",
        }
        for key, label in labels.items():
            if key in self.parts:
                lines.append(f"{label:<40}{self.parts[key] / GiB:>9.2f}")
        lines += [
            f"{'total':<40}{self.total / GiB:>9.2f}",
            f"{f'usable ({100 * (1 - RESERVE):.0f}% of HBM)':<40}{self.usable / GiB:>9.2f}",
            "",
            self.verdict(),
        ]
        return "\n".join(lines)


def plan_memory(
    model: ModelConfig,
    train: TrainConfig,
    seq_len: int,
    mesh: MeshConfig | dict[str, int],
    tpu: TpuSlice,
    *,
    config_path: str = "<config>",
    model_source: str = "model",
) -> MemoryPlan:
    """The per-device memory plan of training ``model`` with ``train`` on ``tpu``."""
    sizes = resolve_mesh(MeshConfig(**mesh) if isinstance(mesh, dict) else mesh, tpu.devices)
    micro = train.batch_size // train.grad_accum
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if micro % shards:
        raise DemError(
            f"{config_path}: a micro-batch of {micro} rows (train.batch_size / train.grad_accum)"
            f" does not split over data×fsdp×expert = {shards} devices"
        )
    rows = micro // shards
    # The model as the trainer runs it (dem_jax.train.loop): weights loaded in
    # train.param_dtype, computed in train.compute_dtype.
    model = model.replace(
        param_dtype=train.param_dtype, dtype=train.compute_dtype, remat=train.remat
    )
    elems = sharded_param_elements(model, sizes)
    p, c = DTYPE_BYTES[train.param_dtype], DTYPE_BYTES[train.compute_dtype]
    n = elems["per_device"]
    parts = {
        "params": n * p,
        "optimizer": 2 * n * p,
        "gradients": n * p,
    }
    if train.grad_accum > 1:
        parts["grad_accum"] = n * p
    parts["gathered"] = (2 * elems["layer_gathered"] + elems["vocab_gathered"]) * c
    acts = activation_bytes(
        model,
        rows,
        seq_len,
        train.compute_dtype,
        sizes["tensor"],
        train.remat,
        sizes["expert"],
    )
    parts["activations"] = acts["total"]
    return MemoryPlan(
        config_path=config_path,
        model=model,
        model_source=model_source,
        slice=tpu,
        mesh=sizes,
        train=train,
        seq_len=seq_len,
        rows_per_device=rows,
        num_params=elems["total"],
        params_per_device=n,
        parts=parts,
        activations=acts,
    )


def plan_run(
    config_path: str | os.PathLike,
    overrides: list[str] | None = None,
    slice_name: str | None = None,
    model_config: str | None = None,
) -> MemoryPlan:
    """Load a run config and plan it on a slice (see :func:`resolve_model_config` and
    :func:`resolve_slice` for where the architecture and the slice come from)."""

    run = load_run_config(config_path, overrides)
    model, source = resolve_model_config(run, config_path, model_config)
    tpu = resolve_slice(run, config_path, slice_name)
    return plan_memory(
        model,
        run.train,
        run.data.seq_len,
        run.mesh,
        tpu,
        config_path=str(config_path),
        model_source=source,
    )


def plan_json(plan: MemoryPlan) -> str:
    """The plan as indented JSON."""
    return json.dumps(plan.to_dict(), indent=2)
