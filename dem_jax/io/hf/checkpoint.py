"""Hugging Face model directories: load onto a mesh, export from memory."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.config import from_hf_config, to_hf_config
from dem_jax.io.hf.directory import (
    DEFAULT_MAX_SHARD_BYTES,
    finish_hf_directory,
    hf_writer,
)
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint
from dem_jax.io.hf.weights import check_checkpoint, hf_tensor_specs, iter_hf_tensors, read_params
from dem_jax.io.modeldir import HF_CONFIG, Model
from dem_jax.io.outputs import atomic_directory
from dem_jax.io.storage import read_json
from dem_jax.sharding.rules import param_shardings


def load_hf(directory: str | os.PathLike, mesh: Mesh | None = None, dtype: str | None = None):
    """Load a Hugging Face directory onto ``mesh`` (or the default device).

    Parameters keep the checkpoint's dtype unless ``dtype`` is given.
    """
    directory = storage.path(directory)
    storage.check_complete(directory)
    hf_config = read_json(directory / HF_CONFIG)
    where = str(directory / HF_CONFIG)
    with SafetensorsCheckpoint(directory) as ckpt:
        config = from_hf_config(hf_config, where)
        if "model.embed_tokens.weight" not in ckpt:
            raise DemError(f"{directory}: missing tensor model.embed_tokens.weight")
        stored = str(jnp.dtype(ckpt.dtype("model.embed_tokens.weight")))
        param_dtype = dtype or stored
        config = config.replace(param_dtype=param_dtype, dtype=param_dtype)
        check_checkpoint(ckpt, config, str(directory))
        _check_tokenizer(directory, config)
        params = read_params(ckpt, config, param_shardings(config, mesh))
    return Model(config, params, hf_config=hf_config, assets_dir=directory)


def _check_tokenizer(directory: storage.AnyPath, config) -> None:
    """A tokenizer with more tokens than the embedding has rows would index out of range."""
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(storage.local_copy(tok_file)))
        size = tokenizer.get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise DemError(f"{tok_file}: cannot be read ({e})") from None
    if size > config.vocab_size:
        raise DemError(
            f"{tok_file}: tokenizer has {size} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )


def save_hf(
    model: Model,
    out: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> storage.AnyPath:
    """Write ``model`` as a Hugging Face directory (sharded safetensors, config.json,
    generation config, tokenizer files and a model card), atomically."""
    config = model.config
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    hf_config = to_hf_config(config, model.hf_config)
    specs = hf_tensor_specs(config, np_dtype)
    with atomic_directory(out, overwrite) as tmp:
        with hf_writer(tmp, specs, max_shard_bytes, f"writing {storage.path(out).name}") as writer:
            for name, array in iter_hf_tensors(model.params, config, np_dtype):
                writer.write(name, array)
        finish_hf_directory(tmp, hf_config, model.assets_dir, model.metadata)
    return storage.path(out)
