"""Model architectures known without their weights, and where a run's comes from.

``dem-jax plan`` needs only the shapes of a model: a built-in architecture
(``KNOWN_ARCHITECTURES``), a Hugging Face ``config.json``, a
``dem_jax_model.json``, a model directory holding either, or what the run
config says (``model.init``, ``model.arch``, a local ``model.path``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dem_jax.config.model import ModelConfig
from dem_jax.config.run import RunConfig
from dem_jax.errors import DemError
from dem_jax.io.hf.config import from_hf_config
from dem_jax.io.modeldir import DEM_METADATA, HF_CONFIG
from dem_jax.io.storage import read_json

# The architecture fields of each model's Hugging Face config.json
# (openlm-research/open_llama_{3b,7b,13b}, meta-llama/Llama-2-7b-hf), mapped
# through dem_jax.io.hf.config like any config.json.
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}


def _shape(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    }


KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "openllama-3b": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 3200,
        "intermediate_size": 8640,
        "num_hidden_layers": 26,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float16",
    },
    "openllama-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float16",
    },
    "openllama-13b": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float16",
    },
    "llama-2-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "float16",
    },
    # The other families' common sizes (mistralai/Mixtral-8x7B-v0.1, google/gemma-2-9b,
    # Qwen/Qwen3-8B, microsoft/Phi-3-mini-4k-instruct, Qwen/Qwen3-30B-A3B,
    # allenai/OLMo-2-1124-7B): the shape fields only; the rest are the family's defaults.
    "mixtral-8x7b": {
        "model_type": "mixtral",
        **_shape(32000, 4096, 14336, 32, 32, 8),
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "torch_dtype": "bfloat16",
    },
    "gemma-2-9b": {
        "model_type": "gemma2",
        **_shape(256000, 3584, 14336, 42, 16, 8),
        "head_dim": 256,
        "torch_dtype": "bfloat16",
    },
    "qwen3-8b": {
        "model_type": "qwen3",
        **_shape(151936, 4096, 12288, 36, 32, 8),
        "head_dim": 128,
        "torch_dtype": "bfloat16",
    },
    "phi-3-mini": {
        "model_type": "phi3",
        **_shape(32064, 3072, 8192, 32, 32, 32),
        "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        **_shape(151936, 2048, 6144, 48, 32, 4),
        "head_dim": 128,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "torch_dtype": "bfloat16",
    },
    "olmo-2-7b": {
        "model_type": "olmo2",
        **_shape(100352, 4096, 11008, 32, 32, 32),
        "torch_dtype": "float32",
    },
}


def known_architecture(name: str) -> ModelConfig:
    """The ModelConfig of a built-in architecture (``openllama-7b``, ``llama-2-7b``, ...)."""
    if name not in KNOWN_ARCHITECTURES:
        raise DemError(f"unknown architecture {name!r} (known: {', '.join(KNOWN_ARCHITECTURES)})")
    return from_hf_config(KNOWN_ARCHITECTURES[name], where=f"architecture {name}")


def read_model_config(source: str) -> ModelConfig:
    """A ModelConfig from a known architecture name, a Hugging Face ``config.json``,
    a ``dem_jax_model.json``, or a model directory holding either."""
    if source in KNOWN_ARCHITECTURES:
        return known_architecture(source)
    path = Path(source)
    if path.is_dir():
        for name in (DEM_METADATA, HF_CONFIG):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DemError(f"{source}: no {HF_CONFIG} or {DEM_METADATA} in this directory")
    elif not path.is_file():
        raise DemError(
            f"{source}: not a file, a model directory or a known architecture "
            f"({', '.join(KNOWN_ARCHITECTURES)})"
        )
    data = read_json(path)
    if isinstance(data.get("model"), dict):  # dem_jax_model.json
        return ModelConfig.from_dict(data["model"], where=f"{path}: model")
    if "architectures" in data or "model_type" in data:
        return from_hf_config(data, where=str(path))
    return ModelConfig.from_dict(data, where=str(path))


def resolve_model_config(
    run: RunConfig, config_path: str | os.PathLike, model_config: str | None = None
) -> tuple[ModelConfig, str]:
    """The architecture a run trains, and where it came from.

    In order: ``--model-config``; ``model.init``; ``model.arch``; a local
    ``model.path``.
    """
    if model_config:
        return read_model_config(model_config), model_config
    if run.model.init is not None:
        return ModelConfig.from_dict(dict(run.model.init), where="model.init"), "model.init"
    if run.model.arch:
        return known_architecture(run.model.arch), run.model.arch
    path = run.model.path
    if path and "://" not in path and Path(path).is_dir():
        return read_model_config(path), path
    raise DemError(
        f"{config_path}: cannot read the architecture of model.path {path!r} here; "
        f"pass --model-config with a config.json, a model directory or one of "
        f"{', '.join(KNOWN_ARCHITECTURES)}"
    )
