"""The Llama-family decoder as Flax NNX modules.

Covers what Hugging Face's ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``Qwen2ForCausalLM`` compute: RMSNorm, RoPE (with scaling), grouped-query
attention, SwiGLU, optional q/k/v and o biases, sliding windows, tied or
untied embeddings.

All layers live in one :class:`Block` whose parameters carry a leading
``layers`` axis; the forward pass runs one ``jax.lax.scan`` over it, so
compile time does not grow with depth. Every parameter is an ``nnx.Param``
with a ``logical_axes`` tuple that :mod:`dem_jax.sharding` maps onto a mesh.

Shape letters: B batch, T query length, S key length, D hidden, H query
heads, K key/value heads, G = H // K, Dh head dim, F MLP width, V vocab,
L layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dem_jax.config.model import ModelConfig
from dem_jax.model.attention import attention
from dem_jax.model.rope import apply_rope, rope_tables

# Large enough to mean "no window" for any real sequence.
_NO_WINDOW = 2**30
# Without remat, a layer keeps the outputs of its weight matmuls (dots with no batch
# dimension: not the attention scores) for the backward pass; MaxText's "minimal".
_SAVE_MATMUL_OUTPUTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
_INIT_STD = 0.02  # Hugging Face's initializer_range default for Llama


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    """A parameter tagged with its logical axis names (one per dimension)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """Root-mean-square norm; statistics in float32 as the reference does."""

    def __init__(self, config: ModelConfig, stack: tuple[int, ...] = ()):
        axes = ("layers",) * len(stack) + ("norm",)
        self.scale = _param(None, (*stack, config.hidden_size), axes, config.param_dtype, "ones")
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * x32.astype(dtype)


class Dense(nnx.Module):
    """x @ kernel (+ bias), kernel shaped (in_dims..., out_dims...) so heads stay explicit."""

    def __init__(self, rngs, stack, in_shape, out_shape, in_axes, out_axes, dtype, bias=False):
        lead = ("layers",) * len(stack)
        self.kernel = _param(
            rngs, (*stack, *in_shape, *out_shape), (*lead, *in_axes, *out_axes), dtype
        )
        self.bias = (
            _param(rngs, (*stack, *out_shape), (*lead, *out_axes), dtype, "zeros") if bias else None
        )
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c = config
        d, h, k, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dense = functools.partial(Dense, rngs, stack, dtype=c.param_dtype)
        self.q_proj = dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), bias=c.qkv_bias)
        self.k_proj = dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), bias=c.qkv_bias)
        self.v_proj = dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), bias=c.qkv_bias)
        self.o_proj = dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), bias=c.o_bias)
        self.kind = c.attention  # which kernel (dem_jax.model.attention)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        """Attention of x (B, T, D) over itself, or, with a KV cache ``kv`` = (k, v) each
        (B, S, K, Dh), over the cache after writing x's keys/values at ``index``."""
        q = apply_rope(self.q_proj(x), cos, sin)  # (B, T, H, Dh)
        k = apply_rope(self.k_proj(x), cos, sin)  # (B, T, K, Dh)
        v = self.v_proj(x)  # (B, T, K, Dh)
        if kv is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)  # (B, S, K, Dh)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.kind)
        out = self.o_proj(out)  # (B, T, H, Dh) -> (B, T, D)
        return out if kv is None else (out, kv)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        d, f = config.hidden_size, config.intermediate_size
        dense = functools.partial(Dense, rngs, stack, dtype=config.param_dtype)
        self.gate_proj = dense((d,), (f,), ("embed",), ("mlp",))
        self.up_proj = dense((d,), (f,), ("embed",), ("mlp",))
        self.down_proj = dense((f,), (d,), ("mlp",), ("embed",))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embed(nnx.Module):
    """Token embedding table (V, D); also the output projection when tied."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        shape = (config.vocab_size, config.hidden_size)
        self.embedding = _param(rngs, shape, ("vocab", "embed"), config.param_dtype)


class Block(nnx.Module):
    """One pre-norm decoder layer. Built with ``stack=(L,)`` it holds all L layers."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.attn_norm = RMSNorm(config, stack)
        self.attn = Attention(config, rngs, stack)
        self.mlp_norm = RMSNorm(config, stack)
        self.mlp = MLP(config, rngs, stack)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        attn = self.attn(self.attn_norm(x), cos, sin, mask, kv, index)
        if kv is not None:
            attn, kv = attn
        x = x + attn
        x = x + self.mlp(self.mlp_norm(x))
        return x if kv is None else (x, kv)


class DecoderLM(nnx.Module):
    """Token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = Embed(c, rngs)
        self.layers = Block(c, rngs, stack=(c.num_layers,))
        self.final_norm = RMSNorm(c)
        if not c.tie_embeddings:
            self.lm_head = Dense(
                rngs, (), (c.hidden_size,), (c.vocab_size,), ("embed",), ("vocab",), c.param_dtype
            )

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
        """Logits (B, T, V) float32; with a ``cache`` (see :func:`init_cache`) also the
        updated cache, the new tokens' keys and values written after the old ones."""
        x, cos, sin, segment_ids = self._embed(tokens, positions, segment_ids)
        if cache is None:
            x, _ = self._run_layers(x, cos, sin, segment_ids, segment_ids, 0, None)
        else:
            index = cache["index"]
            key_segments = jax.lax.dynamic_update_slice(
                cache["segments"], segment_ids.astype(jnp.int32), (0, index)
            )
            x, kv = self._run_layers(
                x, cos, sin, segment_ids, key_segments, index, (cache["k"], cache["v"])
            )
            cache = {
                "k": kv[0],
                "v": kv[1],
                "segments": key_segments,
                "index": index + tokens.shape[1],
            }
        logits = (self.final_norm(x) @ self.output_kernel()).astype(jnp.float32)
        return logits if cache is None else (logits, cache)

    def hidden(self, tokens, positions=None, segment_ids=None):
        """Final-normed hidden states (B, T, D) in the compute dtype: the logits are
        ``hidden @ output_kernel()``, left to the caller so a loss can take them a
        chunk at a time (see :func:`dem_jax.model.losses.chunked_nll_sum`)."""
        x, cos, sin, segment_ids = self._embed(tokens, positions, segment_ids)
        x, _ = self._run_layers(x, cos, sin, segment_ids, segment_ids, 0, None)
        return self.final_norm(x)

    def _embed(self, tokens, positions, segment_ids):
        """Embedded tokens (B, T, D), the RoPE tables and the segment ids (defaults:
        positions 0..T-1, one segment)."""
        c = self.config
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = rope_tables(c, positions)
        x = jnp.take(self.embed.embedding[...], tokens, axis=0).astype(jnp.dtype(c.dtype))
        return x, cos, sin, segment_ids

    def output_kernel(self, dtype=None) -> jax.Array:
        """The (D, V) output projection: the lm_head, or the embedding when tied."""
        dtype = jnp.dtype(self.config.dtype if dtype is None else dtype)
        if self.config.tie_embeddings:
            return self.embed.embedding[...].astype(dtype).T
        return self.lm_head.kernel[...].astype(dtype)

    def _run_layers(self, x, cos, sin, q_segments, k_segments, index, kv):
        c = self.config
        graphdef, state = nnx.split(self.layers)
        windows = layer_windows(c)

        def layer(x, scanned):
            layer_state, window, layer_kv = scanned
            mask = attention_mask(q_segments, window, k_segments, index)
            block = nnx.merge(graphdef, layer_state)
            if layer_kv is None:
                return block(x, cos, sin, mask), None
            return block(x, cos, sin, mask, layer_kv, index)

        # What the backward pass finds saved: with remat only each layer's input; without,
        # also the outputs of its weight matmuls (q, k, v, o, gate, up), and the
        # elementwise work between them (norms, RoPE, softmax, SiLU) and the attention
        # scores are recomputed. For SmolLM2-135M at 4 x 256 tokens that keeps 1.5 GB
        # instead of 3.2 GB and is no slower (less written to memory and read back).
        if c.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)
        else:
            layer = jax.checkpoint(layer, prevent_cse=False, policy=_SAVE_MATMUL_OUTPUTS)
        return jax.lax.scan(layer, x, (state, windows, kv))


def layer_windows(config: ModelConfig) -> jax.Array:
    """(L,) int32 attention window per layer; a huge value where attention is full."""
    windows = config.sliding_windows or (None,) * config.num_layers
    return jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)


def attention_mask(
    segment_ids: jax.Array,
    window: jax.Array | int = _NO_WINDOW,
    key_segment_ids: jax.Array | None = None,
    offset: jax.Array | int = 0,
) -> jax.Array:
    """(B, T, S) boolean: causal, same segment, and within the sliding window.

    Segment ids separate packed documents (and padding, as its own segment),
    so tokens never attend across documents; every row keeps at least its
    own position, so no softmax row is empty. With a KV cache the keys are
    the cache's S slots and query t sits at slot ``offset + t``.
    """
    if key_segment_ids is None:
        key_segment_ids = segment_ids
    q_idx = offset + jnp.arange(segment_ids.shape[1])
    k_idx = jnp.arange(key_segment_ids.shape[1])
    distance = q_idx[:, None] - k_idx[None, :]  # query slot minus key slot
    local = (distance >= 0) & (distance < window)
    same = segment_ids[:, :, None] == key_segment_ids[:, None, :]
    return local[None] & same


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache for ``length`` positions: keys/values (L, B, S, K, Dh), the
    segment id of each slot (-1: empty, never attended) and the next slot index."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    dtype = dtype or jnp.dtype(config.dtype)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segments": jnp.full((batch, length), -1, jnp.int32),
        "index": jnp.int32(0),
    }


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment (B, T), for packed rows."""
    idx = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


@functools.lru_cache(maxsize=32)
def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a model, without allocating it."""
    return nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))


def init_params(config: ModelConfig, seed: int | jax.Array = 0) -> dict[str, Any]:
    """Randomly initialised parameters as a plain nested dict of arrays (``seed`` may
    be traced, so one compiled initialiser serves every seed)."""
    rngs = nnx.Rngs(params=jax.random.key(seed))
    return nnx.to_pure_dict(nnx.state(DecoderLM(config, rngs=rngs)))


def param_axes(config: ModelConfig) -> dict[str, Any]:
    """The logical axis names of every parameter, as a dict shaped like the params."""
    _, state = abstract_model(config)
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: v.get_metadata()["logical_axes"],
            state,
            is_leaf=lambda v: isinstance(v, nnx.Variable),
        )
    )


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` of every parameter, as a dict shaped like the params."""
    _, state = abstract_model(config)
    return nnx.to_pure_dict(state)


def bind(config: ModelConfig, params: dict[str, Any]) -> DecoderLM:
    """An NNX model whose parameters are ``params`` (usable inside ``jax.jit``)."""
    graphdef, state = abstract_model(config)
    state = jax.tree.map(lambda x: x, state)  # a fresh copy: the cached one is shared
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def apply(params, config: ModelConfig, tokens, positions=None, segment_ids=None):
    """Pure forward pass: logits (B, T, V) float32 for tokens (B, T)."""
    return bind(config, params)(tokens, positions=positions, segment_ids=segment_ids)


def apply_hidden(params, config: ModelConfig, tokens, positions=None, segment_ids=None):
    """Pure forward pass up to the output projection: (hidden (B, T, D), kernel (D, V))."""
    model = bind(config, params)
    return model.hidden(tokens, positions, segment_ids), model.output_kernel()
