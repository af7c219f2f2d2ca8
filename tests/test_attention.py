"""The fused attention kernels against the reference einsum softmax, and the chunked
cross-entropy against the loss on whole logits: same values and gradients, with the
masks real batches have (causal, sliding window, packed documents, padding), GQA,
and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax.config.model import ModelConfig
from dem_jax.model import transformer
from dem_jax.model.attention import attention, reference_attention
from dem_jax.model.generate import greedy_generate, left_pad
from dem_jax.model.losses import batch_nll, chunked_nll_sum, masked_nll_sum
from dem_jax.model.transformer import attention_mask, init_params


def packed_segments(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Segment ids of packed rows: documents of random lengths, then padding (id 0)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, length), np.int32)
    for b in range(batch):
        pos, seg = 0, 1
        while pos < length - 3:
            n = int(rng.integers(2, length // 2))
            out[b, pos : pos + n] = seg
            pos, seg = pos + n, seg + 1
    return out


def qkv(b=2, t=24, h=4, k=2, hd=8, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, hd), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, hd), dtype)
    v = jax.random.normal(keys[2], (b, t, k, hd), dtype)
    return q, kk, v


MASKS = {
    "causal": lambda b, t: attention_mask(jnp.ones((b, t), jnp.int32)),
    "window": lambda b, t: attention_mask(jnp.ones((b, t), jnp.int32), 5),
    "packed_padded": lambda b, t: attention_mask(jnp.asarray(packed_segments(b, t))),
    "packed_window": lambda b, t: attention_mask(jnp.asarray(packed_segments(b, t, 1)), 4),
}


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_xla_kernel_matches_reference(heads, mask_kind):
    h, k = heads
    q, kk, v = qkv(h=h, k=k)
    mask = MASKS[mask_kind](q.shape[0], q.shape[1])
    ref = reference_attention(q, kk, v, mask)
    out = attention(q, kk, v, mask, "xla")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)

    def loss(fn):
        return lambda q, kk, v: jnp.sum(jnp.sin(fn(q, kk, v, mask)))

    g_ref = jax.jit(jax.grad(loss(reference_attention), argnums=(0, 1, 2)))(q, kk, v)
    g_out = jax.jit(jax.grad(loss(lambda *a: attention(*a, "xla")), argnums=(0, 1, 2)))(q, kk, v)
    for a, b in zip(g_out, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_auto_is_the_xla_kernel_on_cpu():
    q, kk, v = qkv()
    mask = MASKS["packed_padded"](2, 24)
    np.testing.assert_array_equal(
        attention(q, kk, v, mask, "auto"), attention(q, kk, v, mask, "xla")
    )


def tiny(kind: str, **changes) -> ModelConfig:
    base = dict(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, sliding_windows=(None, 6), attention=kind,
    )  # fmt: skip
    return ModelConfig(**{**base, **changes})


def packed_batch(b=2, t=32, vocab=53, seed=0):
    seg = packed_segments(b, t, seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    positions = np.zeros_like(tokens)
    for r in range(b):
        for s in np.unique(seg[r]):
            idx = np.nonzero(seg[r] == s)[0]
            positions[r, idx] = np.arange(len(idx))
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = (seg > 0) & (np.roll(seg, -1, axis=1) == seg)
    return {
        "tokens": jnp.asarray(tokens),
        "positions": jnp.asarray(positions),
        "segment_ids": jnp.asarray(seg),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.asarray(loss_mask.astype(np.float32)),
    }


def test_model_logits_and_gradients_match_reference_on_packed_rows():
    ref_cfg, xla_cfg = tiny("reference"), tiny("xla")
    params = init_params(ref_cfg, 0)
    batch = packed_batch()
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    ref = jax.jit(transformer.apply, static_argnums=1)(params, ref_cfg, *args)
    out = jax.jit(transformer.apply, static_argnums=1)(params, xla_cfg, *args)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    g_ref = jax.jit(jax.grad(lambda p: batch_nll(p, ref_cfg, batch)[0]))(params)
    g_out = jax.jit(jax.grad(lambda p: batch_nll(p, xla_cfg, batch)[0]))(params)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_is_the_same_with_either_kernel():
    """Left-padded prompts of different lengths (a padding mask), then one token at a
    time against the cache."""
    ref_cfg, xla_cfg = tiny("reference"), tiny("xla")
    params = init_params(ref_cfg, 1)
    rng = np.random.default_rng(0)
    tokens, mask = left_pad([list(rng.integers(3, 53, n)) for n in (7, 3, 5)], pad_id=0)
    a = greedy_generate(params, ref_cfg, tokens, mask, max_new_tokens=12, eos_id=2)
    b = greedy_generate(params, xla_cfg, tokens, mask, max_new_tokens=12, eos_id=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_attention_kind_is_refused():
    with pytest.raises(ValueError, match=r"model\.attention"):
        tiny("flash3")


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk", [1, 5, 7, 32])
def test_chunked_cross_entropy_equals_whole_logits(chunk, softcap):
    """Same sum, count and gradients (w.r.t. hidden states and the output kernel) as
    the loss on whole logits, for chunks that do and do not divide T, and with Gemma 2's
    final soft-capping (cap · tanh(logits / cap), differentiated by jax here)."""
    b, t, d, v = 2, 21, 16, 97
    keys = jax.random.split(jax.random.key(3), 3)
    hidden = jax.random.normal(keys[0], (b, t, d))
    kernel = jax.random.normal(keys[1], (d, v)) * 0.3
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    mask = (jnp.arange(t)[None] < jnp.asarray([[t - 4], [t]])).astype(jnp.float32)

    def whole(h, w):
        logits = h @ w if softcap is None else softcap * jnp.tanh((h @ w) / softcap)
        return masked_nll_sum(logits, targets, mask)

    def chunked(h, w):
        return chunked_nll_sum(h, w, targets, mask, chunk=chunk, softcap=softcap)

    (s1, c1), (s2, c2) = jax.jit(whole)(hidden, kernel), jax.jit(chunked)(hidden, kernel)
    np.testing.assert_allclose(s2, s1, rtol=1e-6)
    assert float(c1) == float(c2) == 2 * t - 4
    g1 = jax.jit(jax.grad(lambda h, w: whole(h, w)[0], argnums=(0, 1)))(hidden, kernel)
    g2 = jax.jit(jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1)))(hidden, kernel)
    for a, c in zip(g2, g1, strict=True):
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5)


def test_batch_nll_equals_the_loss_on_the_model_logits():
    cfg = tiny("auto", vocab_size=211)
    params = init_params(cfg, 2)
    batch = packed_batch(vocab=211)
    logits = jax.jit(transformer.apply, static_argnums=1)(
        params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    want = masked_nll_sum(logits, batch["targets"], batch["loss_mask"])
    got = jax.jit(batch_nll, static_argnums=1)(params, cfg, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert float(got[1]) == float(want[1])


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    """XLA's own buffer accounting: the gradient of the chunked loss needs far less
    temporary memory than the (B, T, V) float32 logits it avoids."""
    b, t, d, v = 2, 512, 32, 16000
    hidden, kernel = jnp.zeros((b, t, d)), jnp.zeros((d, v))
    targets, mask = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t))

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(fn, argnums=(0, 1)))
        return grad.lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda h, w: masked_nll_sum(h @ w, targets, mask)[0])
    chunked = temp_bytes(lambda h, w: chunked_nll_sum(h, w, targets, mask, chunk=32)[0])
    logits_bytes = b * t * v * 4
    assert whole >= logits_bytes
    assert chunked < logits_bytes / 4, (chunked, logits_bytes)
