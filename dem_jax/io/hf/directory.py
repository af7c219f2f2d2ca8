"""Writing a Hugging Face model directory: its safetensors shards (process 0 writes,
the others only take part in the gathers) and its config, tokenizer and model card.
Without JAX: the host merge executor writes through it too."""

from __future__ import annotations

import json
from typing import Any

from dem_jax.io import storage
from dem_jax.io.assets import copy_hf_assets, special_token_ids, write_model_card
from dem_jax.io.hf.config import with_token_ids
from dem_jax.io.hf.safetensors_writer import ShardedSafetensorsWriter
from dem_jax.io.modeldir import HF_CONFIG
from dem_jax.lazy import process_index

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # what transformers' save_pretrained used for years


class _Discard:
    """The writer of processes other than 0: they gather every tensor with process 0
    (a collective) but write nothing, so each file has exactly one writer."""

    def write(self, name: str, array: Any) -> None:
        del name, array

    def __enter__(self) -> _Discard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def hf_writer(directory, specs, max_shard_bytes: int, progress: str | None = "writing"):
    """A :class:`ShardedSafetensorsWriter` on process 0 (with a progress bar over the
    bytes written, labelled ``progress``), a no-op writer elsewhere."""
    if process_index() == 0:
        return ShardedSafetensorsWriter(directory, specs, max_shard_bytes, progress=progress)
    return _Discard()


def finish_hf_directory(
    directory, hf_config: dict[str, Any], assets_dir, metadata: dict[str, Any] | None = None
) -> None:
    """Write config.json (bos / eos / pad ids filled from the tokenizer where it has
    none), the tokenizer and generation files of ``assets_dir`` and the model card
    built from ``metadata`` (see :mod:`dem_jax.io.assets`); process 0 only."""
    if process_index() != 0:
        return
    hf_config = with_token_ids(hf_config, special_token_ids(assets_dir))
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    (storage.path(directory) / HF_CONFIG).write_text(text)
    copy_hf_assets(assets_dir, directory, hf_config)
    write_model_card(directory, metadata or {}, assets_dir, "hf")
