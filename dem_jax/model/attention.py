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

TPU splash attention (Pallas) is not wired in yet: TPUs run ``xla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, mask, kind: str = "auto") -> jax.Array:
    """softmax(q kᵀ / √Dh + mask) v of shape (B, T, H, Dh) with the kernel ``kind``."""
    if kind == "reference":
        return reference_attention(q, k, v, mask)
    if kind == "auto":
        kind = "cudnn" if _cudnn_applies(q) else "xla"
        if kind == "cudnn":
            try:
                return _fused(q, k, v, mask, "cudnn")
            except (NotImplementedError, ValueError, RuntimeError):
                kind = "xla"
    return _fused(q, k, v, mask, kind)


def reference_attention(q, k, v, mask) -> jax.Array:
    """The plain computation: float32 scores, masked, softmax, weighted values."""
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)  # (B, T, K, G, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    scores = scores * (hd**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def _fused(q, k, v, mask, implementation: str) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


def _cudnn_applies(q) -> bool:
    hd = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and hd % 8 == 0
        and hd <= 128
    )
