"""FLOP counts for cost accounting and benchmarks.

Matmul FLOPs (2 per multiply-add) of the model as implemented: attention
scores are computed over the full T x T square and then masked, and a mixture
of experts runs every expert on every token (:mod:`dem_jax.model.moe`). A training
step costs a forward and a backward pass, counted as 3 forward passes.
"""

from __future__ import annotations

from dem_jax.config.model import ModelConfig


def forward_flops(c: ModelConfig, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward pass over ``batch`` rows of ``length`` tokens."""
    d, f, h, k, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    mlp = 3 * d * f
    if c.num_experts:  # every expert on every token, plus the router
        mlp = c.num_experts * 3 * d * c.expert_size + d * c.num_experts
    per_token = 2 * (d * h * hd * 2 + d * k * hd * 2 + mlp) * c.num_layers
    per_token += 2 * d * c.vocab_size  # output projection
    attention = 2 * 2 * h * hd * length * length * c.num_layers  # q k^T and p v, per row
    return float(batch * (length * per_token + attention))


def train_flops(c: ModelConfig, batch: int, length: int, steps: int = 1) -> float:
    """FLOPs of ``steps`` training steps (forward + backward = 3 forwards)."""
    return 3.0 * forward_flops(c, batch, length) * steps
