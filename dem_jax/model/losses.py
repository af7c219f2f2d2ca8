"""Token-level losses shared by training, scoring and weight search.

:func:`batch_nll` never materialises the (B, T, V) float32 logits: it takes the
final hidden states and the output projection and computes the loss a chunk of
positions at a time (:func:`chunked_nll_sum`), forming each chunk's gradients in
the same pass. At a 49k vocabulary and 4 × 2048 tokens that is 1.6 GB of logits
(and as much again for their gradient) not held at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dem_jax.model.transformer import apply_hidden, softcap_logits

# Logit elements per chunk (B · chunk · V): 16M float32 values, 64 MiB.
CHUNK_ELEMENTS = 2**24


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


def chunk_length(batch: int, length: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk's logits hold at most about ``elements``
    values, the chunks as equal as can be: the fewest chunks that fit, each
    ``ceil(length / chunks)`` long, so padding to whole chunks adds less than one
    position per chunk (4 x 256 at vocabulary 49152: 4 chunks of 64, not 4 of 85 with
    84 padded positions, a third more output-projection work)."""
    largest = max(1, min(length, elements // max(1, batch * vocab)))
    chunks = -(-length // largest)
    return -(-length // chunks)


def chunked_nll_sum(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk: int | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`masked_nll_sum` of ``hidden @ kernel`` without the whole logits.

    ``hidden`` (B, T, D), ``kernel`` (D, V). The positions are cut into chunks of
    ``chunk`` (default :func:`chunk_length`) along T — not along the batch, which
    stays sharded over the data axes — and a ``lax.scan`` takes each chunk's logits
    (in the compute dtype, then float32, exactly as the full forward pass does),
    adds its NLL and drops them. Under differentiation the same pass also forms the
    chunk's gradients (softmax − one-hot, times the mask) and folds them into
    ∂hidden and ∂kernel at once, so nothing is recomputed in the backward pass:
    the same matmuls as the unchunked loss, a fraction of its memory. A ``softcap``
    (Gemma 2) caps each chunk's logits as the forward pass does.
    """
    b, t, _ = hidden.shape
    chunk = chunk or chunk_length(b, t, kernel.shape[-1])
    mask = loss_mask.astype(jnp.float32)
    if chunk >= t:
        logits = softcap_logits((hidden @ kernel).astype(jnp.float32), softcap)
        return masked_nll_sum(logits, targets, mask)
    pad = -t % chunk
    if pad:  # padded positions have mask 0, so they add nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    total = _chunked_total(hidden, kernel, targets, mask, chunk, softcap)
    return total, jnp.sum(mask)


def _split(a: jax.Array, chunk: int) -> jax.Array:
    """(B, n·c, ...) -> (n, B, c, ...): the scan runs over chunks of positions."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 1, 0)


def _chunk_terms(h, kernel, y, m, with_grads: bool, softcap=None):
    """One chunk's NLL sum and, if asked, (∂h, ∂kernel) of that sum."""
    logits = (h @ kernel).astype(jnp.float32)  # (B, c, V)
    if softcap is not None:
        capped = jnp.tanh(logits / softcap)
        logits = softcap * capped
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    total = jnp.sum((log_z - target_logit) * m)
    if not with_grads:
        return total, None
    probs = jnp.exp(logits - log_z[..., None])
    g = (probs - jax.nn.one_hot(y, logits.shape[-1], dtype=probs.dtype)) * m[..., None]
    if softcap is not None:  # d(c·tanh(z/c))/dz = 1 - tanh²(z/c)
        g = g * (1 - capped * capped)
    g = g.astype(h.dtype)  # as autodiff casts it back through the astype above
    d_h = jnp.einsum("bcv,dv->bcd", g, kernel)
    d_kernel = jnp.einsum("bcd,bcv->dv", h, g, preferred_element_type=jnp.float32)
    return total, (d_h, d_kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_total(hidden, kernel, targets, mask, chunk, softcap):
    def body(total, xs):
        h, y, m = xs
        return total + _chunk_terms(h, kernel, y, m, False, softcap)[0], None

    xs = (_split(hidden, chunk), _split(targets, chunk), _split(mask, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _chunked_total_fwd(hidden, kernel, targets, mask, chunk, softcap):
    def body(carry, xs):
        total, d_kernel = carry
        h, y, m = xs
        part, (d_h, d_k) = _chunk_terms(h, kernel, y, m, True, softcap)
        return (total + part, d_kernel + d_k), d_h

    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    xs = (_split(hidden, chunk), _split(targets, chunk), _split(mask, chunk))
    (total, d_kernel), d_h = jax.lax.scan(body, init, xs)
    d_h = jnp.moveaxis(d_h, 0, 1).reshape(hidden.shape)  # back to (B, T, D)
    return total, (d_h, d_kernel.astype(kernel.dtype))


def _chunked_total_bwd(chunk, softcap, residuals, g):
    d_h, d_kernel = residuals
    return (g * d_h).astype(d_h.dtype), (g * d_kernel).astype(d_kernel.dtype), None, None


_chunked_total.defvjp(_chunked_total_fwd, _chunked_total_bwd)


def batch_nll(params, config, batch) -> tuple[jax.Array, jax.Array]:
    """Summed NLL and token count of a batch of rows (see dem_jax.data.packing)."""
    hidden, kernel = apply_hidden(
        params,
        config,
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    return chunked_nll_sum(
        hidden, kernel, batch["targets"], batch["loss_mask"], softcap=config.final_softcap
    )
