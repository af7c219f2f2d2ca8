"""The decoder as Flax NNX modules.

Covers what Hugging Face's ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM``,
``Gemma3ForCausalLM``, ``Phi3ForCausalLM``, ``Olmo2ForCausalLM``,
``MixtralForCausalLM`` and ``Qwen3MoeForCausalLM`` compute: RMSNorm (pre, post or
sandwich; Llama's, OLMo's or Gemma's scale), RoPE (with scaling, partial, per
layer kind), grouped-query attention with optional q/k norms, biases, score
scale and soft-capping, sliding windows, SwiGLU/GeGLU or routed experts,
scaled, tied or untied embeddings and soft-capped logits. The layers themselves
are in :mod:`dem_jax.model.layers`.

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
from dem_jax.model.layers import MLP, Attention, Dense, Embed, RMSNorm
from dem_jax.model.moe import MoE
from dem_jax.model.rope import rope_tables

# Large enough to mean "no window" for any real sequence.
NO_WINDOW = 2**30
# Without remat, a layer keeps the outputs of its weight matmuls (dots with no batch
# dimension: not the attention scores) for the backward pass; MaxText's "minimal".
_SAVE_MATMUL_OUTPUTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class Block(nnx.Module):
    """One decoder layer. Built with ``stack=(L,)`` it holds all L layers.

    Norms by ``config.norm_placement``: "pre" normalises the inputs of attention
    and MLP (``attn_norm``, ``mlp_norm``), "post" their outputs before the residual
    add (``post_attn_norm``, ``post_mlp_norm``), "sandwich" both.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        placement = config.norm_placement
        if placement in ("pre", "sandwich"):
            self.attn_norm = RMSNorm(config, stack)
        if placement in ("post", "sandwich"):
            self.post_attn_norm = RMSNorm(config, stack)
        self.attn = Attention(config, rngs, stack)
        if placement in ("pre", "sandwich"):
            self.mlp_norm = RMSNorm(config, stack)
        if placement in ("post", "sandwich"):
            self.post_mlp_norm = RMSNorm(config, stack)
        self.mlp = MoE(config, rngs, stack) if config.num_experts else MLP(config, rngs, stack)

    def _norm(self, name: str, x):
        norm = getattr(self, name, None)
        return x if norm is None else norm(x)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        attn = self.attn(self._norm("attn_norm", x), cos, sin, mask, kv, index)
        if kv is not None:
            attn, kv = attn
        x = x + self._norm("post_attn_norm", attn)
        x = x + self._norm("post_mlp_norm", self.mlp(self._norm("mlp_norm", x)))
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
        c = self.config
        x, cos, sin, segment_ids = self.embed_inputs(tokens, positions, segment_ids)
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
        logits = softcap_logits(
            (self.final_norm(x) @ self.output_kernel()).astype(jnp.float32), c.final_softcap
        )
        return logits if cache is None else (logits, cache)

    def hidden(self, tokens, positions=None, segment_ids=None):
        """Final-normed hidden states (B, T, D) in the compute dtype: the logits are
        ``hidden @ output_kernel()``, left to the caller so a loss can take them a
        chunk at a time (see :func:`dem_jax.model.losses.chunked_nll_sum`)."""
        x, cos, sin, segment_ids = self.embed_inputs(tokens, positions, segment_ids)
        x, _ = self._run_layers(x, cos, sin, segment_ids, segment_ids, 0, None)
        return self.final_norm(x)

    def embed_inputs(self, tokens, positions, segment_ids):
        """Embedded tokens (B, T, D), the cos and sin tables stacked per kind of layer
        (k, B, T, R; see :func:`rope_kinds`) and the segment ids (defaults: positions
        0..T-1, one segment)."""
        c = self.config
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # One (cos, sin) pair per kind of layer: global, and Gemma 3's sliding layers
        # with their own base (the scan picks one per layer).
        tables = [rope_tables(c, positions)]
        if c.local_rope_theta is not None:
            tables.append(rope_tables(c, positions, local=True))
        cos = jnp.stack([t[0] for t in tables])
        sin = jnp.stack([t[1] for t in tables])
        dtype = jnp.dtype(c.dtype)
        x = jnp.take(self.embed.embedding[...], tokens, axis=0).astype(dtype)
        if c.embed_scale:  # Gemma: times sqrt(D), rounded to the compute dtype first
            x = x * jnp.asarray(c.hidden_size**0.5, dtype)
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
        kinds = rope_kinds(windows, cos.shape[0])

        def layer(x, scanned):
            layer_state, window, kind, layer_kv = scanned
            mask = attention_mask(q_segments, window, k_segments, index)
            block = nnx.merge(graphdef, layer_state)
            layer_cos, layer_sin = cos[kind], sin[kind]
            if layer_kv is None:
                return block(x, layer_cos, layer_sin, mask), None
            return block(x, layer_cos, layer_sin, mask, layer_kv, index)

        # What the backward pass finds saved: with remat only each layer's input; without,
        # also the outputs of its weight matmuls (q, k, v, o, gate, up), and the
        # elementwise work between them (norms, RoPE, softmax, SiLU) and the attention
        # scores are recomputed. For SmolLM2-135M at 4 x 256 tokens that keeps 1.5 GB
        # instead of 3.2 GB and is no slower (less written to memory and read back).
        if c.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)
        else:
            layer = jax.checkpoint(layer, prevent_cse=False, policy=_SAVE_MATMUL_OUTPUTS)
        return jax.lax.scan(layer, x, (state, windows, kinds, kv))


def softcap_logits(logits: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's final soft-capping ``cap · tanh(logits / cap)``; unchanged without a cap."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def rope_kinds(windows: jax.Array, tables: int) -> jax.Array:
    """(L,) index of the rope table each layer takes from ``embed_inputs``' stack of
    ``tables``: 1 (local) for Gemma 3's sliding layers when there are two, else 0."""
    return (windows < NO_WINDOW).astype(jnp.int32) * (tables - 1)


def layer_windows(config: ModelConfig) -> jax.Array:
    """(L,) int32 attention window per layer; a huge value where attention is full."""
    windows = config.sliding_windows or (None,) * config.num_layers
    return jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)


def attention_mask(
    segment_ids: jax.Array,
    window: jax.Array | int = NO_WINDOW,
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
