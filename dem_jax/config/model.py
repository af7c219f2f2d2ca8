"""The model architecture config.

``ModelConfig`` describes one Llama-family decoder (Llama 1/2/3, Mistral,
Qwen2). It is architecture-only: nothing here depends on where the weights
came from. Hugging Face ``config.json`` files are mapped onto it in
:mod:`dem_jax.io.hf.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dem_jax.errors import DemError, did_you_mean

ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_KINDS = ("auto", "xla", "cudnn", "reference")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face ``rope_parameters``."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear and llama3: context extension factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

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
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

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
