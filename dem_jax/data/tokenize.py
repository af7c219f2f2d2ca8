"""Tokenisation with a Hugging Face tokenizer read from a local directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage


def load_tokenizer(path: str | os.PathLike | None):
    """``AutoTokenizer`` from a local directory (never the network)."""
    if path is None:
        raise DemError("data.tokenizer: no tokenizer given and the base model has none")
    directory = storage.path(path)
    if not directory.is_dir() or not any(directory.glob("tokenizer*")):
        raise DemError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    directory = storage.local_copy(directory)  # transformers reads local files only
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizers
        raise DemError(f"{directory}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class Encoding:
    """One tokenised record. ``loss_mask[t]`` says whether token t is a target,
    i.e. whether predicting it (from tokens < t) counts in the loss."""

    ids: np.ndarray  # (n,) int32
    loss_mask: np.ndarray  # (n,) bool


def encode_record(
    tokenizer, record: dict[str, Any], template: str = "{prompt}", add_bos=True, add_eos=True
) -> Encoding:
    """Token ids and loss mask of one record.

    Prompt and completion are tokenised separately and concatenated, so the
    boundary (and the loss mask) is exact whatever the tokenizer merges.
    """
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    if "text" in record:
        body = _ids(tokenizer, record["text"])
        ids = bos + body + eos
        mask = [False] * len(bos) + [True] * (len(body) + len(eos))
    else:
        prompt = _ids(tokenizer, template.format(prompt=record["prompt"]))
        completion = _ids(tokenizer, record["completion"])
        ids = bos + prompt + completion + eos
        mask = [False] * (len(bos) + len(prompt)) + [True] * (len(completion) + len(eos))
    return Encoding(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
