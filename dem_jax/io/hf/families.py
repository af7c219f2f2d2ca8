"""What each model family's ``config.json`` says beyond Llama's fields.

One function reads a family's switches (where the norms sit, q/k norms, Gemma's
scalars, fused projections) into :class:`~dem_jax.config.model.ModelConfig`
fields and one writes them back for a model that did not come from Hugging
Face. A key a config.json leaves out takes the default of that family's
transformers config class (Qwen3's ``head_dim`` is 128, Gemma's 256, Gemma ties
its embeddings), so a sparse config.json means what it means to transformers.
"""

from __future__ import annotations

from typing import Any

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError

# transformers' config-class defaults for the keys below, where they differ by family.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 128},
    "phi3": {"rms_norm_eps": 1e-5},
    "olmo2": {"rms_norm_eps": 1e-5},
    "mixtral": {"rms_norm_eps": 1e-5},
    "gemma2": {
        "head_dim": 256,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
    },
    "gemma3": {
        "head_dim": 256,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window": 4096,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATIONS = {ours: hf for hf, ours in _ACTIVATIONS.items()}


def hf_get(hf: dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    """``hf[key]``, else the family's transformers default, else ``default``."""
    if key in hf:
        return hf[key]
    return _DEFAULTS.get(arch, {}).get(key, default)


def _positive(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise DemError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _activation(hf: dict[str, Any], arch: str, where: str) -> str:
    # Gemma's MLP reads hidden_activation (its hidden_act is a legacy key).
    key = "hidden_activation" if arch.startswith("gemma") else "hidden_act"
    act = (
        hf.get(key)
        or hf.get("hidden_act")
        or ("gelu_pytorch_tanh" if arch.startswith("gemma") else "silu")
    )
    if act not in _ACTIVATIONS:
        raise DemError(
            f"{where}: {key} {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[act]


def family_fields(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The ModelConfig fields that tell ``arch``'s layers from Llama's."""
    bias = bool(hf.get("attention_bias", False))
    fields: dict[str, Any] = {
        "hidden_act": _activation(hf, arch, where),
        "qkv_bias": arch == "qwen2" or bias,
        "o_bias": arch != "qwen2" and bias,
    }
    if arch in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = "head"
    elif arch == "olmo2":
        fields.update(norm_kind="float32", norm_placement="post", qk_norm="full")
    elif arch in ("gemma2", "gemma3"):
        if hf.get("use_bidirectional_attention"):
            raise DemError(f"{where}: use_bidirectional_attention (an encoder) is not supported")
        softcaps = ("attn_logit_softcapping", "final_logit_softcapping")
        attn_cap, final_cap = (hf_get(hf, arch, k) for k in softcaps)
        fields.update(
            norm_kind="gemma",
            norm_placement="sandwich",
            embed_scale=True,
            query_pre_attn_scalar=_positive(
                hf_get(hf, arch, "query_pre_attn_scalar"), "query_pre_attn_scalar", where
            ),
            attn_softcap=None if attn_cap is None else float(attn_cap),
            final_softcap=None if final_cap is None else float(final_cap),
            qk_norm="head" if arch == "gemma3" else None,
        )
    elif arch == "phi3":
        fields.update(fused_qkv=True, fused_gate_up=True)
    if arch in ("mixtral", "qwen3_moe"):
        fields.update(moe_fields(hf, arch, where))
    return fields


def moe_fields(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The experts of Mixtral and Qwen3-MoE (every layer sparse; Qwen3-MoE's dense
    ``mlp_only_layers`` would break the one scanned block, so they are refused)."""
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    if not experts or not hf.get("num_experts_per_tok"):
        raise DemError(f"{where}: a {arch} config needs num_local_experts and num_experts_per_tok")
    fields: dict[str, Any] = {
        "num_experts": int(experts),
        "experts_per_token": int(hf["num_experts_per_tok"]),
        "norm_topk_prob": True,  # Mixtral always renormalises the top k
    }
    if arch == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise DemError(
                f"{where}: dense layers among the experts (mlp_only_layers, "
                "decoder_sparse_step > 1) are not supported"
            )
        fields["moe_intermediate_size"] = int(require(hf, "moe_intermediate_size", where))
        fields["norm_topk_prob"] = bool(hf.get("norm_topk_prob", False))
    return fields


def require(hf: dict[str, Any], key: str, where: str) -> Any:
    """``hf[key]``, or a DemError naming the missing field."""
    if hf.get(key) is None:
        raise DemError(f"{where}: missing required field {key!r}")
    return hf[key]


def layer_kinds(hf: dict[str, Any], arch: str, layers: int) -> list[str] | None:
    """Each layer's ``layer_types`` entry (full_attention / sliding_attention) for the
    families that alternate, from the config or the family's own rule."""
    types = hf.get("layer_types")
    if types is not None:
        return list(types)
    if arch == "gemma2":  # transformers: sliding on even layers
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if arch == "gemma3":  # every `sliding_window_pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ]
    return None


def sliding_windows(hf: dict[str, Any], arch: str, layers: int) -> tuple[int | None, ...] | None:
    """Per-layer attention windows, following each architecture's own rules."""
    if arch in ("mistral", "phi3", "mixtral"):
        return (hf.get("sliding_window"),) * layers
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types") or [
            "sliding_attention"
            if window is not None and i >= hf.get("max_window_layers", 28)
            else "full_attention"
            for i in range(layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in types)
    if arch in ("gemma2", "gemma3"):
        window = hf_get(hf, arch, "sliding_window")
        types = layer_kinds(hf, arch, layers)
        return tuple(window if t == "sliding_attention" else None for t in types)
    return None


def family_hf_fields(c: ModelConfig) -> dict[str, Any]:
    """The config.json keys of ``c``'s family switches, for a fresh export (the caller
    reads the result back to check the family can say what ``c`` says)."""
    out: dict[str, Any] = {}
    act_key = "hidden_activation" if c.architecture.startswith("gemma") else "hidden_act"
    out[act_key] = _HF_ACTIVATIONS[c.hidden_act]
    if c.architecture in ("gemma2", "gemma3"):
        scalar = c.query_pre_attn_scalar or c.head_dim  # None scales by head_dim**-0.5
        out.update(
            # an int in transformers' Gemma configs: 5.x refuses 16.0 when loading
            query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
            attn_logit_softcapping=c.attn_softcap,
            final_logit_softcapping=c.final_softcap,
        )
    if c.architecture != "qwen2":  # Qwen2's q/k/v biases are always on
        out["attention_bias"] = c.qkv_bias
    if c.num_experts:
        out.update(num_local_experts=c.num_experts, num_experts_per_tok=c.experts_per_token)
    if c.architecture == "qwen3_moe":
        out.update(
            moe_intermediate_size=c.expert_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    return out
