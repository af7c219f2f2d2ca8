"""Tokenisation with a Hugging Face tokenizer read from a local directory.

A tokenizer directory is data, never code: one whose ``tokenizer_config.json``
or ``config.json`` asks transformers for custom classes (``auto_map``) is refused,
and transformers is always told ``trust_remote_code=False``, so it neither runs
the directory's Python files nor asks about them on the terminal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dem_jax.config.run import check_prompt_template
from dem_jax.errors import DemError, first_line
from dem_jax.io import storage

# config.json auto_map keys a tokenizer load consults (AutoTokenizer reads the config
# when tokenizer_config.json names no class); other keys name model code we never load.
_TOKENIZER_AUTO_CLASSES = ("AutoTokenizer", "AutoConfig")


def load_tokenizer(path: str | os.PathLike | None):
    """``AutoTokenizer`` from a local directory (never the network, never its code)."""
    if path is None:
        raise DemError("data.tokenizer: no tokenizer given and the base model has none")
    directory = storage.path(path)
    if not directory.is_dir() or not any(directory.glob("tokenizer*")):
        raise DemError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    directory = storage.local_copy(directory)  # transformers reads local files only
    refuse_custom_code(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types for broken tokenizers
        raise DemError(f"{directory}: cannot load tokenizer ({first_line(e)})") from None


def refuse_custom_code(directory: storage.AnyPath) -> None:
    """DemError if loading the tokenizer in ``directory`` would need its Python files."""
    for name in ("tokenizer_config.json", "config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DemError(f"{path}: not valid JSON ({first_line(e)})") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        model_code_only = (
            name == "config.json"
            and isinstance(auto_map, dict)
            and not any(k in auto_map for k in _TOKENIZER_AUTO_CLASSES)
        )
        if not auto_map or model_code_only:
            continue
        raise DemError(
            f"{directory}: {name} has auto_map (custom code); "
            "dem-jax never runs code from a model directory"
        )


def tokenizer_size(tokenizer) -> tuple[int, int]:
    """(number of tokens, largest id the tokenizer can produce), added and special
    tokens included."""
    ids = list(tokenizer.get_vocab().values())
    ids += [i for i in getattr(tokenizer, "all_special_ids", []) if isinstance(i, int)]
    return len(tokenizer), max(ids, default=-1)


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """DemError unless every id the tokenizer can produce has an embedding row among
    the model's ``vocab_size`` (``where`` names the model). Past the embedding a lookup
    would not fail: it would train and score garbage."""
    size, top = tokenizer_size(tokenizer)
    if top >= vocab_size or size > vocab_size:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DemError(
            f"{where}: tokenizer {name} has {size} tokens (ids up to {top}) but the "
            f"model's vocab_size is {vocab_size}"
        )


def check_ids_fit(arrays: Iterable[np.ndarray], vocab_size: int, where: str) -> None:
    """DemError if a token id in ``arrays`` (rows' or batches' tokens and targets) is
    ``vocab_size`` or more: the cheap guard behind :func:`check_tokenizer_fits`."""
    top = max((int(a.max()) for a in arrays if a.size), default=-1)
    if top >= vocab_size:
        raise DemError(
            f"{where}: token id {top} in the tokenised data but the model's "
            f"vocab_size is {vocab_size}"
        )


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
        try:
            prompt_text = template.format(prompt=record["prompt"])
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            check_prompt_template(template, "prompt template")  # names the field
            raise DemError(f"prompt template {template!r}: {first_line(e)}") from None
        prompt = _ids(tokenizer, prompt_text)
        completion = _ids(tokenizer, record["completion"])
        ids = bos + prompt + completion + eos
        mask = [False] * (len(bos) + len(prompt)) + [True] * (len(completion) + len(eos))
    return Encoding(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
