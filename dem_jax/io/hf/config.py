"""Hugging Face ``config.json`` ⇄ :class:`ModelConfig`.

Reads configs written by transformers 4.x (``rope_theta`` and ``rope_scaling``
at the top level) and 5.x (``rope_parameters``), since most published
checkpoints are 4.x. Exports keep the source's own ``config.json`` and only
overwrite the fields dem-jax owns, so a round trip returns the same file, with one
addition: a config that spells its rope in the 5.x block alone also gets the 4.x
keys (transformers 4.x ignores ``rope_parameters`` and would silently use
``rope_theta`` 10000), so every export loads the same model in 4.57+ and 5.x. 5.x
reads the 4.x keys itself, so a 4.x config is left as it is.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from dem_jax.config.model import ROPE_TYPES, ModelConfig, RopeScaling
from dem_jax.errors import DemError
from dem_jax.io.hf.families import (
    family_fields,
    family_hf_fields,
    hf_get,
    require,
    sliding_windows,
)

# Hugging Face class -> (dem-jax architecture, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "Gemma2ForCausalLM": ("gemma2", "gemma2"),
    "Gemma3ForCausalLM": ("gemma3", "gemma3_text"),
    "Phi3ForCausalLM": ("phi3", "phi3"),
    "Olmo2ForCausalLM": ("olmo2", "olmo2"),
    "MixtralForCausalLM": ("mixtral", "mixtral"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen3_moe"),
}
_BY_MODEL_TYPE = {model_type: cls for cls, (_, model_type) in ARCHITECTURES.items()}
_HF_CLASS = {arch: cls for cls, (arch, _) in ARCHITECTURES.items()}
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def hf_architecture(hf: dict[str, Any], where: str = "config.json") -> str:
    """The Hugging Face class name of a config, or a DemError naming its model_type
    and class and the supported model types."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    cls = archs[0] if archs else _BY_MODEL_TYPE.get(model_type or "")
    if cls not in ARCHITECTURES:
        found = f"model_type {model_type!r}" if model_type else "no model_type"
        if archs:
            found += f" ({archs[0]})"
        supported = ", ".join(f"{t} ({c})" for t, c in _BY_MODEL_TYPE.items())
        raise DemError(f"{where}: {found} is not supported (supported: {supported})")
    return cls


def _rope(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The ModelConfig rope fields (rope_theta, rope_scaling, partial_rotary_factor,
    local_rope_theta) from either the 5.x or the 4.x spelling."""
    params = hf.get("rope_parameters")
    local_theta = None
    if isinstance(params, dict) and "full_attention" in params:  # 5.x, per layer type
        local = params.get("sliding_attention") or {}
        if (local.get("rope_type") or "default") != "default":
            raise DemError(f"{where}: scaled rope on sliding-window layers is not supported")
        local_theta = local.get("rope_theta")
        params = params["full_attention"]
    if isinstance(params, dict):  # transformers 5.x
        theta = params.get("rope_theta", hf_get(hf, arch, "rope_theta", 10000.0))
        scaling = params
    else:  # transformers 4.x
        theta = hf_get(hf, arch, "rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    if arch == "gemma3" and local_theta is None:
        local_theta = hf_get(hf, arch, "rope_local_base_freq")
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise DemError(
            f"{where}: rope scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    kwargs: dict[str, Any] = {"rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(require(scaling, "factor", f"{where}: rope scaling"))
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            kwargs[key] = require(scaling, key, f"{where}: rope scaling")
    if rope_type == "longrope":  # Phi-3: the pretraining length may sit at the top level
        for key in ("short_factor", "long_factor"):
            kwargs[key] = require(scaling, key, f"{where}: rope scaling")
        original = scaling.get("original_max_position_embeddings")
        original = original or hf.get("original_max_position_embeddings")
        kwargs["original_max_position_embeddings"] = int(
            original or require(hf, "max_position_embeddings", where)
        )
        for key in ("factor", "attention_factor"):
            if scaling.get(key) is not None:
                kwargs[key] = float(scaling[key])
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return {
        "rope_theta": float(theta),
        "rope_scaling": RopeScaling(**kwargs),
        "partial_rotary_factor": float(partial),
        "local_rope_theta": None if local_theta is None else float(local_theta),
    }


def from_hf_config(
    hf: dict[str, Any], where: str = "config.json", param_dtype: str | None = None
) -> ModelConfig:
    """Map a Hugging Face config dict onto a ModelConfig (DemError naming the bad field)."""
    cls = hf_architecture(hf, where)
    arch = ARCHITECTURES[cls][0]
    if hf.get("mlp_bias"):
        raise DemError(f"{where}: mlp_bias=true is not supported")
    heads = int(require(hf, "num_attention_heads", where))
    layers = int(require(hf, "num_hidden_layers", where))
    dtype = param_dtype or _TORCH_DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), "float32")
    return ModelConfig(
        vocab_size=int(require(hf, "vocab_size", where)),
        hidden_size=int(require(hf, "hidden_size", where)),
        intermediate_size=int(require(hf, "intermediate_size", where)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=hf_get(hf, arch, "head_dim"),
        architecture=arch,
        rms_norm_eps=float(hf_get(hf, arch, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf_get(hf, arch, "tie_word_embeddings", False)),
        sliding_windows=sliding_windows(hf, arch, layers),
        param_dtype=dtype,
        dtype=dtype,
        **_rope(hf, arch, where),
        **family_fields(hf, arch, where),
    )


def to_hf_config(config: ModelConfig, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face config dict for ``config``.

    With ``source`` (the config the weights came from) every field dem-jax does
    not model is kept as it was, in the source's own 4.x or 5.x spelling; the
    result is checked to map back onto ``config``.
    """
    if source is not None:
        hf = copy.deepcopy(source)
        dtype_key = "torch_dtype" if "torch_dtype" in hf and "dtype" not in hf else "dtype"
        hf[dtype_key] = config.param_dtype
        back = from_hf_config(hf, "source config")
        if back.replace(dtype=config.dtype, remat=config.remat) != config:
            raise DemError("model config differs from its source config.json architecture")
        return with_4x_rope_keys(hf)
    return with_4x_rope_keys(_fresh_hf_config(config))


def with_layers(hf: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """``hf`` (a source model's config.json) rewritten for ``config``, a model of the
    same family with other layers (a layer-stacking merge): ``num_hidden_layers``, and
    each layer's attention (``layer_types``, and the window keys when a layer slides)
    for the families whose layers differ; a DemError when the family's config.json
    cannot say which layers slide (one window size; Mistral's on every layer)."""
    hf = dict(hf)
    hf["num_hidden_layers"] = config.num_layers
    windows = _fresh_windows(config)
    if "layer_types" in windows:  # written even where a rule derived them before
        hf["layer_types"] = windows.pop("layer_types")
    if config.sliding_windows is not None:
        hf.update(windows)
    return hf


def with_4x_rope_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` plus the transformers 4.x spelling of its rope (top-level ``rope_theta``
    and ``rope_scaling``: null, or the scaling dict without ``rope_theta``) when it has
    only the 5.x ``rope_parameters`` block; keys already present are kept.

    Both versions then read one rope: 4.x reads the top-level keys, 5.x takes a
    non-null ``rope_scaling`` in place of ``rope_parameters`` (with the top-level
    ``rope_theta``), else ``rope_parameters``, and the two say the same. Gemma 3's
    block per layer type gives ``rope_theta`` and ``rope_local_base_freq``; Phi's
    ``partial_rotary_factor`` and longrope's pretraining length go to the top level
    and its scaling is the three keys 4.x's Phi-3 accepts.
    """
    params = hf.get("rope_parameters")
    if not isinstance(params, dict):
        return hf  # a 4.x config: 5.x reads it as it is
    hf = dict(hf)
    if "full_attention" in params:  # Gemma 3: one block per layer type
        local = params.get("sliding_attention") or {}
        if "rope_theta" in local:
            hf.setdefault("rope_local_base_freq", local["rope_theta"])
        params = params["full_attention"]
    if "rope_theta" not in params:
        return hf
    hf.setdefault("rope_theta", params["rope_theta"])
    if "partial_rotary_factor" in params:
        hf.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    if "rope_scaling" not in hf:
        rope_type = params.get("rope_type", params.get("type")) or "default"
        if rope_type == "default":
            scaling = None
        elif rope_type == "longrope":
            scaling = {k: params[k] for k in ("short_factor", "long_factor")}
            scaling["type"] = "longrope"
            if params.get("original_max_position_embeddings") is not None:
                hf.setdefault(
                    "original_max_position_embeddings", params["original_max_position_embeddings"]
                )
        else:
            drop = ("rope_theta", "partial_rotary_factor")
            scaling = {k: v for k, v in params.items() if k not in drop}
        hf["rope_scaling"] = scaling
    return hf


def with_token_ids(hf: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
    """``hf`` with ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` taken from
    ``ids`` (the tokenizer's) where the config has none; the config's own win."""
    hf = dict(hf)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is None and ids.get(key) is not None:
            hf[key] = ids[key]
    return hf


def _fresh_rope(c: ModelConfig) -> dict[str, Any]:
    """The 5.x ``rope_parameters`` block of ``c``."""
    s = c.rope_scaling
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": s.rope_type}
    if s.rope_type in ("linear", "llama3"):
        rope["factor"] = s.factor
    if s.rope_type == "llama3":
        rope.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    if s.rope_type == "longrope":
        rope.update(
            short_factor=list(s.short_factor),
            long_factor=list(s.long_factor),
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
        if s.factor != 1.0:
            rope["factor"] = s.factor
        if s.attention_factor is not None:
            rope["attention_factor"] = s.attention_factor
    if c.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = c.partial_rotary_factor
    if c.local_rope_theta is None:
        return rope
    local = {"rope_type": "default", "rope_theta": c.local_rope_theta}
    return {"full_attention": rope, "sliding_attention": local}


def _fresh_windows(c: ModelConfig) -> dict[str, Any]:
    """The config.json keys of ``c``'s sliding windows, in its family's spelling."""
    windows = c.sliding_windows or (None,) * c.num_layers
    used = {w for w in windows if w is not None}
    if len(used) > 1:
        raise DemError("model.sliding_windows: a config.json has one window size")
    window = next(iter(used), None)
    types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    if c.architecture in ("mistral", "phi3", "mixtral"):
        if len(set(windows)) != 1:
            raise DemError(f"model.sliding_windows: {c.architecture} uses one window everywhere")
        return {"sliding_window": window}
    if c.architecture in ("qwen2", "qwen3", "qwen3_moe"):
        return {"use_sliding_window": bool(used), "sliding_window": window, "layer_types": types}
    if c.architecture in ("gemma2", "gemma3"):
        return {"sliding_window": window or 4096, "layer_types": types}
    if used:
        raise DemError(f"model.sliding_windows: {c.architecture} has no sliding-window attention")
    return {}


def _fresh_hf_config(c: ModelConfig) -> dict[str, Any]:
    """A transformers 5.x style config for a model that did not come from Hugging Face,
    read back to check that its family's config.json can say everything ``c`` says."""
    cls = _HF_CLASS[c.architecture]
    hf: dict[str, Any] = {
        "architectures": [cls],
        "model_type": ARCHITECTURES[cls][1],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_parameters": _fresh_rope(c),
        "dtype": c.param_dtype,
        # No token ids but the tokenizer's (filled in on export): left out, the config
        # class's defaults apply, and Phi-3's pad id 32000 lies outside a small vocab.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **_fresh_windows(c),
        **family_hf_fields(c),
    }
    back = from_hf_config(hf, "model").replace(dtype=c.dtype, remat=c.remat, attention=c.attention)
    if back != c:
        differs = [
            f.name for f in dataclasses.fields(c) if getattr(back, f.name) != getattr(c, f.name)
        ]
        raise DemError(
            f"model: {', '.join(differs)} not expressible in a {c.architecture} config.json"
        )
    return hf
