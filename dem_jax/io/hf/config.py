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
from typing import Any

from dem_jax.config.model import ModelConfig, RopeScaling
from dem_jax.errors import DemError

# Hugging Face class -> (dem-jax architecture, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
}
_BY_MODEL_TYPE = {model_type: cls for cls, (_, model_type) in ARCHITECTURES.items()}
_HF_CLASS = {arch: cls for cls, (arch, _) in ARCHITECTURES.items()}
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def hf_architecture(hf: dict[str, Any], where: str = "config.json") -> str:
    """The Hugging Face class name of a config, or a DemError naming what was found."""
    archs = hf.get("architectures") or []
    cls = archs[0] if archs else _BY_MODEL_TYPE.get(hf.get("model_type", ""))
    if cls not in ARCHITECTURES:
        found = cls or hf.get("model_type") or "none given"
        raise DemError(
            f"{where}: architecture {found!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    return cls


def _require(hf: dict[str, Any], key: str, where: str):
    if hf.get(key) is None:
        raise DemError(f"{where}: missing required field {key!r}")
    return hf[key]


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from either the 5.x or the 4.x spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5.x
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:  # transformers 4.x
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise DemError(
            f"{where}: rope scaling type {rope_type!r} is not supported "
            "(supported: default, linear, llama3)"
        )
    kwargs: dict[str, Any] = {"rope_type": rope_type}
    if rope_type != "default":
        kwargs["factor"] = float(_require(scaling, "factor", f"{where}: rope scaling"))
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            kwargs[key] = _require(scaling, key, f"{where}: rope scaling")
    return float(theta), RopeScaling(**kwargs)


def _sliding_windows(hf: dict[str, Any], arch: str, layers: int) -> tuple[int | None, ...] | None:
    """Per-layer attention windows, following each architecture's own rules."""
    if arch == "mistral":
        return (hf.get("sliding_window"),) * layers
    if arch == "qwen2":
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types") or [
            "sliding_attention"
            if window is not None and i >= hf.get("max_window_layers", 28)
            else "full_attention"
            for i in range(layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in types)
    return None


def from_hf_config(
    hf: dict[str, Any], where: str = "config.json", param_dtype: str | None = None
) -> ModelConfig:
    """Map a Hugging Face config dict onto a ModelConfig (DemError naming the bad field)."""
    cls = hf_architecture(hf, where)
    arch = ARCHITECTURES[cls][0]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise DemError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise DemError(f"{where}: mlp_bias=true is not supported")
    heads = int(_require(hf, "num_attention_heads", where))
    layers = int(_require(hf, "num_hidden_layers", where))
    theta, scaling = _rope(hf, where)
    attention_bias = bool(hf.get("attention_bias", False))
    dtype = param_dtype or _TORCH_DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), "float32")
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", where)),
        hidden_size=int(_require(hf, "hidden_size", where)),
        intermediate_size=int(_require(hf, "intermediate_size", where)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=hf.get("head_dim"),
        architecture=arch,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch != "qwen2" and attention_bias,
        sliding_windows=_sliding_windows(hf, arch, layers),
        param_dtype=dtype,
        dtype=dtype,
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


def with_4x_rope_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` plus the transformers 4.x spelling of its rope (top-level ``rope_theta``
    and ``rope_scaling``: null, or the scaling dict without ``rope_theta``) when it has
    only the 5.x ``rope_parameters`` block; keys already present are kept.

    Both versions then read one rope: 4.x reads the top-level keys, 5.x takes a
    non-null ``rope_scaling`` in place of ``rope_parameters`` (with the top-level
    ``rope_theta``), else ``rope_parameters``, and the two say the same.
    """
    params = hf.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return hf  # a 4.x config (5.x reads it as it is), or one nested per layer type
    hf = dict(hf)
    hf.setdefault("rope_theta", params["rope_theta"])
    if "rope_scaling" not in hf:
        rope_type = params.get("rope_type", params.get("type")) or "default"
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        hf["rope_scaling"] = None if rope_type == "default" else scaling
    return hf


def with_token_ids(hf: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
    """``hf`` with ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` taken from
    ``ids`` (the tokenizer's) where the config has none; the config's own win."""
    hf = dict(hf)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is None and ids.get(key) is not None:
            hf[key] = ids[key]
    return hf


def _fresh_hf_config(c: ModelConfig) -> dict[str, Any]:
    """A transformers 5.x style config for a model that did not come from Hugging Face."""
    cls = _HF_CLASS[c.architecture]
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": c.rope_scaling.rope_type}
    if c.rope_scaling.rope_type != "default":
        rope["factor"] = c.rope_scaling.factor
    if c.rope_scaling.rope_type == "llama3":
        s = c.rope_scaling
        rope.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
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
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_parameters": rope,
        "dtype": c.param_dtype,
    }
    windows = c.sliding_windows or (None,) * c.num_layers
    if c.architecture == "llama":
        if c.sliding_windows is not None:
            raise DemError("model.sliding_windows: Llama has no sliding-window attention")
        if c.qkv_bias != c.o_bias:
            raise DemError("model: Llama's attention_bias sets q/k/v and o biases together")
        hf["attention_bias"] = c.qkv_bias
    elif c.architecture == "mistral":
        if len(set(windows)) != 1:
            raise DemError("model.sliding_windows: Mistral uses one window for every layer")
        hf["sliding_window"] = windows[0]
    else:  # qwen2
        used = {w for w in windows if w is not None}
        if len(used) > 1 or not c.qkv_bias or c.o_bias:
            raise DemError("model: not expressible as a Qwen2 config (bias or window layout)")
        hf["use_sliding_window"] = bool(used)
        hf["sliding_window"] = used.pop() if used else None
        hf["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in windows
        ]
    return hf
