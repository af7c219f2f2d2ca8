"""Scaled dot-product attention: the kernels and how one is chosen.

Every kind takes queries (B, T, H, Dh), keys and values (B, S, K, Dh) with
H a multiple of K (grouped-query attention: each key/value head serves H // K
query heads and is never repeated in memory) and a boolean mask (B, T, S) that
already holds causality, the sliding window and the packed-document (segment)
and padding structure (see :func:`dem_jax.model.transformer.attention_mask`).

* ``reference``: the einsum softmax written out, float32 scores; the ground truth
  the others are tested against.
* ``xla``: :func:`jax.nn.dot_product_attention`, XLA's fused implementation.
* ``cudnn``: the same call with cuDNN's flash-attention kernel (NVIDIA GPUs, 16-bit
  inputs): scores are never stored whole, so memory grows with T, not T².
* ``auto``: ``cudnn`` where it applies (a GPU backend, bfloat16/float16, head dim a
  multiple of 8 up to 128), else ``xla``; a shape cuDNN refuses at trace time falls
  back to ``xla``.

Every kind scales the scores by ``scale`` (default 1/√Dh; Gemma's
``query_pre_attn_scalar``). Gemma 2's soft-capping of the scores
(``softcap · tanh(scores / softcap)``) has no fused kernel, so a softcap runs the
reference computation whatever the kind.

TPU splash attention (Pallas) is not wired in yet: TPUs run ``xla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, mask, kind: str = "auto", scale=None, softcap=None) -> jax.Array:
    """softmax(q kᵀ · scale + mask) v of shape (B, T, H, Dh) with the kernel ``kind``."""
    if kind == "reference" or softcap is not None:
        return reference_attention(q, k, v, mask, scale, softcap)
    if kind == "auto":
        kind = "cudnn" if _cudnn_applies(q) else "xla"
        if kind == "cudnn":
            try:
                return _fused(q, k, v, mask, "cudnn", scale)
            except (NotImplementedError, ValueError, RuntimeError):
                kind = "xla"
    return _fused(q, k, v, mask, kind, scale)


def reference_attention(q, k, v, mask, scale=None, softcap=None) -> jax.Array:
    """The plain computation: float32 scores, scaled, soft-capped, masked, softmax,
    weighted values."""
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)  # (B, T, K, G, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    scores = scores * (hd**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def _fused(q, k, v, mask, implementation: str, scale=None) -> jax.Array:
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation=implementation
    )


def _cudnn_applies(q) -> bool:
    hd = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and hd % 8 == 0
        and hd <= 128
    )
