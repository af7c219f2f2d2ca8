"""The model architecture config.

``ModelConfig`` describes one decoder-only transformer of the families dem-jax
runs: Llama 1/2/3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2,
and the mixture-of-experts Mixtral and Qwen3-MoE. Each family is the Llama
decoder plus a few switches (where the norms sit, q/k norms, Gemma's (1 + w)
norm and soft-capping, fused projections, experts). It is architecture-only:
nothing here depends on where the weights came from. Hugging Face
``config.json`` files are mapped onto it in :mod:`dem_jax.io.hf.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dem_jax.errors import DemError, did_you_mean

ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "mixtral",
    "qwen3_moe",
)
# Where a layer's RMSNorms sit: "pre" (Llama: before attention and MLP), "post"
# (OLMo 2: on the outputs of attention and MLP, before the residual add),
# "sandwich" (Gemma 2/3: both).
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# How RMSNorm applies its scale w: "llama" (w · x̂ after casting x̂ to the compute
# dtype), "float32" (OLMo 2: w · x̂ in float32, then cast), "gemma" ((1 + w) · x̂ in
# float32, then cast; the scale starts at 0).
NORM_KINDS = ("llama", "float32", "gemma")
ACTIVATIONS = ("silu", "gelu_tanh")  # gelu_tanh: PyTorch's gelu(approximate="tanh")
# q/k RMSNorm before RoPE: "head" (Qwen3, Gemma 3: over each head's Dh, one scale
# shared by the heads), "full" (OLMo 2: over the whole H·Dh projection).
QK_NORMS = ("head", "full")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ATTENTION_KINDS = ("auto", "xla", "cudnn", "reference")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face ``rope_parameters``."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear and llama3: context extension factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and longrope
    # longrope (Phi-3): per-frequency divisors, the long ones used once a sequence
    # passes original_max_position_embeddings, and the cos/sin multiplier.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise DemError(
                f"rope_scaling.rope_type: {self.rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if self.factor <= 0:
            raise DemError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise DemError("rope_scaling: high_freq_factor must exceed low_freq_factor for llama3")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.rope_type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise DemError("rope_scaling: longrope needs short_factor and long_factor")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder-only transformer."""

    vocab_size: int
    hidden_size: int  # model width D
    intermediate_size: int  # SwiGLU width F
    num_layers: int
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads K; H % K == 0 (K == H: MHA, K == 1: MQA)
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    architecture: str = "llama"  # which Hugging Face class the weights map to
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix
    qkv_bias: bool = False  # Qwen2, and Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    # Per-layer sliding attention window (None = full attention). Mistral uses
    # one window everywhere; Qwen2 may switch it on only for later layers.
    sliding_windows: tuple[int | None, ...] | None = None
    param_dtype: str = "float32"  # storage dtype of the weights
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: bool = False  # recompute each layer in the backward pass (off: keep matmul outputs)
    # Attention kernel (dem_jax.model.attention): "auto" (cuDNN flash attention on
    # NVIDIA GPUs in 16-bit, else XLA's fused jax.nn.dot_product_attention), "xla",
    # "cudnn", or "reference" (the plain einsum softmax the others are tested against).
    attention: str = "auto"
    # The families' differences from Llama (defaults: Llama).
    norm_placement: str = "pre"  # one of NORM_PLACEMENTS
    norm_kind: str = "llama"  # how RMSNorm applies its scale, one of NORM_KINDS
    qk_norm: str | None = None  # one of QK_NORMS, or None
    hidden_act: str = "silu"  # the gated MLP's activation, one of ACTIVATIONS
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # scores scaled by this**-0.5 (default Dh)
    attn_softcap: float | None = None  # scores -> c·tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  # logits -> c·tanh(logits / c) (Gemma 2)
    local_rope_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3)
    partial_rotary_factor: float = 1.0  # RoPE on the first fraction of each head (Phi)
    fused_qkv: bool = False  # one q/k/v projection (Phi-3's qkv_proj)
    fused_gate_up: bool = False  # one gate/up projection (Phi-3's gate_up_proj)
    # Mixture of experts (Mixtral, Qwen3-MoE): 0 experts is a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0  # top-k experts each token is routed to
    moe_intermediate_size: int | None = None  # each expert's MLP width (default F)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum 1

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise DemError(
                f"model.attention: {self.attention!r} is not one of {', '.join(ATTENTION_KINDS)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise DemError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads <= 0 or self.num_kv_heads <= 0:
            raise DemError("model.num_heads and model.num_kv_heads must be positive")
        if self.num_heads % self.num_kv_heads:
            raise DemError(
                f"model.num_heads ({self.num_heads}) must be a multiple of "
                f"model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise DemError(
                    f"model.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}); set model.head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise DemError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.architecture not in ARCHITECTURES:
            raise DemError(
                f"model.architecture: {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self._check_family_switches()
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise DemError(f"model.{name}: {getattr(self, name)!r} is not one of {DTYPES}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.sliding_windows is not None:
            windows = tuple(self.sliding_windows)
            if len(windows) != self.num_layers:
                raise DemError(
                    f"model.sliding_windows has {len(windows)} entries for {self.num_layers} layers"
                )
            if any(w is not None and w <= 0 for w in windows):
                raise DemError("model.sliding_windows entries must be positive or null")
            object.__setattr__(
                self, "sliding_windows", None if all(w is None for w in windows) else windows
            )

    def _check_family_switches(self) -> None:
        choices = (
            ("norm_placement", NORM_PLACEMENTS),
            ("norm_kind", NORM_KINDS),
            ("hidden_act", ACTIVATIONS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise DemError(
                    f"model.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise DemError(f"model.qk_norm: {self.qk_norm!r} is not one of null, {QK_NORMS}")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise DemError(f"model.{name} must be > 0 or null, got {value}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise DemError(
                f"model.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}"
            )
        if self.rotary_dim % 2:
            raise DemError(f"model: the rotary dimension {self.rotary_dim} must be even")
        if self.num_experts < 0 or (self.num_experts and self.experts_per_token < 1):
            raise DemError("model.num_experts must be >= 0 and experts_per_token >= 1 with experts")
        if self.experts_per_token > max(self.num_experts, 0) and self.num_experts:
            raise DemError(
                f"model.experts_per_token ({self.experts_per_token}) exceeds "
                f"num_experts ({self.num_experts})"
            )
        if self.num_experts and self.fused_gate_up:
            raise DemError("model: fused_gate_up applies to dense MLPs only")

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions RoPE rotates (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def expert_size(self) -> int:
        """Each expert's MLP width."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def num_params(self) -> int:
        """Total number of parameters (tied embeddings counted once)."""
        d, f, h, k, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd * 2 + d * k * hd * 2
        attn += (h + 2 * k) * hd if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        attn += {"head": 2 * hd, "full": (h + k) * hd}.get(self.qk_norm, 0)
        if self.num_experts:
            mlp = self.num_experts * 3 * d * self.expert_size + d * self.num_experts
        else:
            mlp = 3 * d * f
        norms = {"pre": 2, "post": 2, "sandwich": 4}[self.norm_placement] * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + d

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        if out["sliding_windows"] is not None:
            out["sliding_windows"] = list(out["sliding_windows"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> ModelConfig:
        """Build from a dict, naming unknown keys instead of failing with a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hint = did_you_mean(unknown[0], known)
            raise DemError(
                f"{where}: unknown key(s) {', '.join(unknown)}"
                + (f" ({hint.strip()})" if hint else "")
            )
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            rope = data["rope_scaling"]
            rope_known = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(rope) - rope_known)
            if bad:
                raise DemError(f"{where}.rope_scaling: unknown key(s) {', '.join(bad)}")
            data["rope_scaling"] = RopeScaling(**rope)
        if data.get("sliding_windows") is not None:
            data["sliding_windows"] = tuple(data["sliding_windows"])
        try:
            return cls(**data)
        except TypeError as e:  # a missing required field
            raise DemError(f"{where}: {e}") from None
