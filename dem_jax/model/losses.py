"""Token-level losses shared by training, scoring and weight search."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dem_jax.model.transformer import apply


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Negative log-likelihood of each target (B, T), float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def masked_nll_sum(logits, targets, loss_mask) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL over counted targets, number of counted targets)."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_nll(logits, targets) * mask), jnp.sum(mask)


def batch_nll(params, config, batch) -> tuple[jax.Array, jax.Array]:
    """Summed NLL and token count of a batch of rows (see dem_jax.data.packing)."""
    logits = apply(
        params,
        config,
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    return masked_nll_sum(logits, batch["targets"], batch["loss_mask"])
