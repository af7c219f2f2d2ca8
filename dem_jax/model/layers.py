"""The building blocks of a decoder layer as Flax NNX modules: RMSNorm, dense
projections, self-attention and the gated MLP, with every family's variant
(:class:`~dem_jax.config.model.ModelConfig` holds the switches).

Built with ``stack=(L,)`` a module holds all L layers' parameters on a leading
``layers`` axis (see :mod:`dem_jax.model.transformer`). Every parameter is an
``nnx.Param`` with a ``logical_axes`` tuple that :mod:`dem_jax.sharding` maps onto
a mesh. Shape letters: B batch, T query length, S key length, D hidden, H query
heads, K key/value heads, Dh head dim, F MLP width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dem_jax.config.model import ModelConfig
from dem_jax.model.attention import attention
from dem_jax.model.rope import apply_rope

_INIT_STD = 0.02  # Hugging Face's initializer_range default for Llama


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
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
    """Root-mean-square norm over the last axis; statistics in float32 as the
    references compute them, the scale applied as ``config.norm_kind`` says."""

    def __init__(self, config: ModelConfig, stack: tuple[int, ...] = (), size: int | None = None):
        axes = ("layers",) * len(stack) + ("norm",)
        init = "zeros" if config.norm_kind == "gemma" else "ones"  # Gemma scales by 1 + w
        size = size or config.hidden_size
        self.scale = param(None, (*stack, size), axes, config.param_dtype, init)
        self.eps = config.rms_norm_eps
        self.kind = config.norm_kind

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...]
        if self.kind == "llama":  # HF Llama: weight * x̂.to(input dtype)
            return w.astype(dtype) * x32.astype(dtype)
        if self.kind == "float32":  # HF OLMo 2: (weight * x̂).to(input dtype)
            return (w.astype(jnp.float32) * x32).astype(dtype)
        return (x32 * (1.0 + w.astype(jnp.float32))).astype(dtype)  # HF Gemma


class Dense(nnx.Module):
    """x @ kernel (+ bias), kernel shaped (in_dims..., out_dims...) so heads stay explicit."""

    def __init__(self, rngs, stack, in_shape, out_shape, in_axes, out_axes, dtype, bias=False):
        lead = ("layers",) * len(stack)
        self.kernel = param(
            rngs, (*stack, *in_shape, *out_shape), (*lead, *in_axes, *out_axes), dtype
        )
        self.bias = (
            param(rngs, (*stack, *out_shape), (*lead, *out_axes), dtype, "zeros") if bias else None
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
    """Grouped-query self-attention with RoPE, optional q/k norms, a fused q/k/v
    projection (Phi-3), a custom score scale and soft-capping (Gemma)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c = config
        d, h, k, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dense = functools.partial(Dense, rngs, stack, dtype=c.param_dtype)
        if c.fused_qkv:  # one (D, H + 2K, Dh) kernel: q heads, then k, then v
            self.qkv_proj = dense(
                (d,), (h + 2 * k, hd), ("embed",), ("qkv_heads", "head_dim"), bias=c.qkv_bias
            )
        else:
            bias = c.qkv_bias
            self.q_proj = dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), bias=bias)
            self.k_proj = dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), bias=bias)
            self.v_proj = dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), bias=bias)
        self.o_proj = dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), bias=c.o_bias)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c, stack, hd)
            self.k_norm = RMSNorm(c, stack, hd)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c, stack, h * hd)
            self.k_norm = RMSNorm(c, stack, k * hd)
        self.qk_norm = c.qk_norm
        self.heads = (h, k)
        self.scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        self.softcap = c.attn_softcap
        self.kind = c.attention  # which kernel (dem_jax.model.attention)

    def _project(self, x):
        """q (B, T, H, Dh), k and v (B, T, K, Dh), q and k normed when the family does."""
        if hasattr(self, "qkv_proj"):
            h, k = self.heads
            qkv = self.qkv_proj(x)
            q, k, v = qkv[..., :h, :], qkv[..., h : h + k, :], qkv[..., h + k :, :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "full":  # over the whole projection, as OLMo 2 does
            q = self.q_norm(q.reshape(*q.shape[:-2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:-2], -1)).reshape(k.shape)
        return q, k, v

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        """Attention of x (B, T, D) over itself, or, with a KV cache ``kv`` = (k, v) each
        (B, S, K, Dh), over the cache after writing x's keys/values at ``index``."""
        q, k, v = self._project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)  # (B, S, K, Dh)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        out = attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask, self.kind, self.scale, self.softcap
        )
        out = self.o_proj(out)  # (B, T, H, Dh) -> (B, T, D)
        return out if kv is None else (out, kv)


def activation(name: str):
    """The gated MLP's activation: SiLU, or PyTorch's tanh-approximated GELU."""
    if name == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.silu


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU for Gemma. Phi-3 keeps
    gate and up in one (D, 2, F) kernel (its gate_up_proj)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        d, f = config.hidden_size, config.intermediate_size
        dense = functools.partial(Dense, rngs, stack, dtype=config.param_dtype)
        if config.fused_gate_up:
            self.gate_up_proj = dense((d,), (2, f), ("embed",), (None, "mlp"))
        else:
            self.gate_proj = dense((d,), (f,), ("embed",), ("mlp",))
            self.up_proj = dense((d,), (f,), ("embed",), ("mlp",))
        self.down_proj = dense((f,), (d,), ("mlp",), ("embed",))
        self.act = config.hidden_act  # a name: module attributes stay plain data

    def __call__(self, x):
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(activation(self.act)(gate) * up)


class Embed(nnx.Module):
    """Token embedding table (V, D); also the output projection when tied."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        shape = (config.vocab_size, config.hidden_size)
        self.embedding = param(rngs, shape, ("vocab", "embed"), config.param_dtype)
