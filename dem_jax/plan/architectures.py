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
