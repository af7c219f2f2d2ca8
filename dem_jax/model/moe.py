"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE) as a Flax NNX module.

A router (``D -> E`` logits) picks each token's top-k experts; each expert is a
SwiGLU MLP, and the token's output is the experts' outputs weighted by their
router probabilities (renormalised over the top k when ``norm_topk_prob``, as
Mixtral always does). Expert weights carry an ``experts`` logical axis, which
:mod:`dem_jax.sharding.rules` maps onto the mesh's own ``expert`` axis.

Every expert runs on every token and the combine weights are zero outside the
top k: exact, shardable over experts without an all-to-all, and simple; it
costs E/k times the FLOPs of a routed dispatch, which matters for wide MoEs
(see the closing note of the model-families issue). Shape letters: B batch,
T length, D hidden, E experts, F each expert's width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dem_jax.config.model import ModelConfig
from dem_jax.model.layers import activation, param


def route(logits: jax.Array, top_k: int, normalize: bool) -> jax.Array:
    """(..., E) router logits -> (..., E) float32 combine weights, zero outside the
    top k: softmax in float32, the k largest kept (lowest index first on ties, as
    ``torch.topk``), renormalised to sum 1 when ``normalize``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, index = jax.lax.top_k(probs, top_k)  # (..., k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.float32)  # (..., k, E)
    return jnp.einsum("...k,...ke->...e", top, one_hot)


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts; kernels (E, D, F) and (E, F, D) per layer."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c = config
        d, e, f = c.hidden_size, c.num_experts, c.expert_size
        lead = ("layers",) * len(stack)
        dtype = c.param_dtype
        # The router is small and every device needs all of it: replicated over experts.
        self.router = param(rngs, (*stack, d, e), (*lead, "embed", "router"), dtype)
        self.gate_proj = param(rngs, (*stack, e, d, f), (*lead, "experts", "embed", "mlp"), dtype)
        self.up_proj = param(rngs, (*stack, e, d, f), (*lead, "experts", "embed", "mlp"), dtype)
        self.down_proj = param(rngs, (*stack, e, f, d), (*lead, "experts", "mlp", "embed"), dtype)
        self.act = c.hidden_act
        self.top_k = c.experts_per_token
        self.normalize = c.norm_topk_prob
        # Qwen3-MoE rounds the kept probabilities to the compute dtype; Mixtral keeps
        # them in float32 until the weighted expert output is added up.
        self.round_weights = c.architecture == "qwen3_moe"

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        logits = x @ self.router[...].astype(dtype)  # (B, T, E)
        weights = route(logits, self.top_k, self.normalize)  # (B, T, E) float32
        if self.round_weights:
            weights = weights.astype(dtype).astype(jnp.float32)
        gate = jnp.einsum("btd,edf->btef", x, self.gate_proj[...].astype(dtype))
        up = jnp.einsum("btd,edf->btef", x, self.up_proj[...].astype(dtype))
        hidden = activation(self.act)(gate) * up  # (B, T, E, F)
        out = jnp.einsum("btef,efd->bted", hidden, self.down_proj[...].astype(dtype))
        return jnp.einsum("bted,bte->btd", out.astype(jnp.float32), weights).astype(dtype)
