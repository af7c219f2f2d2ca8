"""The files that travel with an exported model's weights, made fit for use.

The tokenizer and generation files are copied from the model's assets directory
(:func:`dem_jax.io.modeldir.copy_assets`); an export then fixes what would make the
copy behave differently from the model it holds:

* ``tokenizer_config.json``: a missing or absurd ``model_max_length`` (transformers
  writes ``VERY_LARGE_INTEGER``, 1e30, when it was never set) becomes the model's
  ``max_position_embeddings``; transformers 5's class name ``TokenizersBackend``,
  unknown to 4.x, becomes ``PreTrainedTokenizerFast`` (the same class in 5.x). The
  chat template (``chat_template`` here, or ``chat_template.jinja`` / ``.json``) is
  kept as it was.
* ``generation_config.json``: copied when the source has one (with the config's
  bos / eos / pad ids filled in where it lacks them), else written with those ids,
  so ``generate()`` stops at EOS.
* ``README.md``: a model card (:mod:`dem_jax.io.model_card`) saying what the model
  is and how it was made; ``mergekit_config.yml``: the MERGE.yaml of a merge.

:func:`stage_assets` prepares the files a merge's output carries when MERGE.yaml or the
command changes them (a new chat template, no tokenizer); :func:`read_chat_template`
reads a tokenizer's template as transformers does.

:func:`special_token_ids` reads the tokenizer's bos / eos / pad ids, which fill
the gaps of ``config.json`` (:func:`dem_jax.io.hf.config.with_token_ids`).
"""

from __future__ import annotations

import json
import os
from importlib import metadata as importlib_metadata
from typing import Any

from dem_jax.errors import DemError
from dem_jax.io import model_card, storage
from dem_jax.io.modeldir import asset_files, copy_assets
from dem_jax.io.storage import read_json

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_CARD = "README.md"
MERGE_CONFIG = "mergekit_config.yml"  # mergekit's name for the YAML it merged by
CHAT_TEMPLATE = "chat_template.jinja"  # where transformers 5 saves a tokenizer's template
PROCESSOR_CHAT_TEMPLATE = "chat_template.json"  # a processor's template (older layout)
# transformers' VERY_LARGE_INTEGER is 1e30; no model's context comes near this.
ABSURD_MAX_LENGTH = 10**12
# config.json's id key -> tokenizer_config.json's token key
_TOKEN_KEYS = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "pad_token_id": "pad_token",
}


def dem_jax_version() -> str:
    """The installed dem-jax version ("unknown" when it is not installed as a package)."""
    try:
        return importlib_metadata.version("dem-jax")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer files write it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_token_ids(directory: str | os.PathLike | None) -> dict[str, int]:
    """bos / eos / pad token ids of the tokenizer in ``directory``, those it defines.

    The tokens come from ``tokenizer_config.json`` (else ``special_tokens_map.json``),
    their ids from ``tokenizer.json`` (else the config's ``added_tokens_decoder``).
    """
    if directory is None:
        return {}
    d = storage.path(directory)
    names: dict[str, str] = {}
    for file in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        if (d / file).is_file():
            cfg = read_json(d / file)
            for key, field in _TOKEN_KEYS.items():
                text = _token_text(cfg.get(field))
                if text is not None:
                    names.setdefault(key, text)
    if not names:
        return {}
    ids = _added_token_ids(d)
    missing = [text for text in names.values() if text not in ids]
    if missing and (d / "tokenizer.json").is_file():
        tokenizer = _read_tokenizer(d / "tokenizer.json")
        for text in missing:
            i = tokenizer.token_to_id(text)
            if i is not None:
                ids[text] = i
    return {key: ids[text] for key, text in names.items() if text in ids}


def _added_token_ids(d: storage.AnyPath) -> dict[str, int]:
    """Token text -> id from ``tokenizer_config.json``'s ``added_tokens_decoder``."""
    if not (d / TOKENIZER_CONFIG).is_file():
        return {}
    decoder = read_json(d / TOKENIZER_CONFIG).get("added_tokens_decoder") or {}
    ids = {}
    for i, tok in decoder.items():
        text = _token_text(tok)
        if text is not None and str(i).isdigit():
            ids[text] = int(i)
    return ids


def _read_tokenizer(tok_file: storage.AnyPath):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, or a DemError naming it."""
    from tokenizers import Tokenizer  # only when there is a tokenizer.json to read

    try:
        return Tokenizer.from_file(str(storage.local_copy(tok_file)))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise DemError(f"{tok_file}: cannot be read ({e})") from None


def sane_tokenizer_config(cfg: dict[str, Any], max_positions: int | None) -> dict[str, Any]:
    """``tokenizer_config.json`` as an export writes it: ``model_max_length`` set to
    ``max_positions`` when missing or absurd, ``TokenizersBackend`` (transformers 5's
    name) as ``PreTrainedTokenizerFast``, which 4.x knows too; nothing else changes."""
    cfg = dict(cfg)
    length = cfg.get("model_max_length")
    valid = isinstance(length, int) and not isinstance(length, bool)
    if max_positions and not (valid and 0 < length < ABSURD_MAX_LENGTH):
        cfg["model_max_length"] = int(max_positions)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return cfg


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A ``generation_config.json`` for a model without one: its bos / eos / pad ids."""
    return {k: hf_config[k] for k in _TOKEN_KEYS if hf_config.get(k) is not None}


def copy_hf_assets(assets_dir, directory, hf_config: dict[str, Any]) -> list[str]:
    """Copy the tokenizer and generation files of ``assets_dir`` into the HF export
    ``directory``, fixing ``tokenizer_config.json`` and writing a
    ``generation_config.json`` when there is none; returns the file names written."""
    directory = storage.path(directory)
    names = copy_assets(assets_dir, directory)
    if TOKENIZER_CONFIG in names:
        path = directory / TOKENIZER_CONFIG
        cfg = read_json(path)
        fixed = sane_tokenizer_config(cfg, hf_config.get("max_position_embeddings"))
        if fixed != cfg:  # as transformers writes it
            path.write_text(json.dumps(fixed, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if GENERATION_CONFIG not in names:
        gen = generation_config(hf_config)
        (directory / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        names.append(GENERATION_CONFIG)
    else:  # the source's, with the ids it lacks (without eos, generate() never stops)
        path = directory / GENERATION_CONFIG
        gen = read_json(path)
        missing = {k: v for k, v in generation_config(hf_config).items() if gen.get(k) is None}
        if missing:
            path.write_text(json.dumps({**gen, **missing}, indent=2) + "\n")
    return names


def write_model_card(directory, metadata: dict[str, Any], assets_dir, fmt: str) -> None:
    """README.md (and, for a merge by MERGE.yaml, ``mergekit_config.yml``) in ``directory``.

    A model with provenance in ``metadata`` (a merge, DEM's search, a pipeline
    baseline, a training run) gets a card built from it. Otherwise the model is a
    conversion: the source's own README.md is kept when it has one (not one dem-jax
    wrote, which is rebuilt for the new format), else a card names the source.
    """
    directory = storage.path(directory)
    version = dem_jax_version()
    card = model_card.card_from_metadata(metadata, fmt=fmt, version=version)
    if card is None:
        source = None if assets_dir is None else storage.path(assets_dir) / MODEL_CARD
        if source is not None and source.is_file():
            text = source.read_text()
            if not model_card.is_dem_jax_card(text):
                storage.copy_file(source, directory / MODEL_CARD)
                return
        card = model_card.conversion_card(
            None if assets_dir is None else str(assets_dir), fmt=fmt, version=version
        )
    (directory / MODEL_CARD).write_text(card)
    merge_yaml = (metadata.get("merge") or {}).get("config_yaml")
    if isinstance(merge_yaml, str):
        (directory / MERGE_CONFIG).write_text(merge_yaml)


def read_chat_template(directory: str | os.PathLike | None) -> str | None:
    """The default chat template of the tokenizer in ``directory``, as transformers
    loads it: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of ``{name, template}`` of which ``default``); None if none."""
    if directory is None:
        return None
    d = storage.path(directory)
    if (d / CHAT_TEMPLATE).is_file():
        return (d / CHAT_TEMPLATE).read_text(encoding="utf-8")
    if not (d / TOKENIZER_CONFIG).is_file():
        return None
    template = read_json(d / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def has_tokenizer(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds tokenizer files (``tokenizer*``)."""
    return any(f.name.startswith("tokenizer") for f in asset_files(directory))


def stage_assets(
    src: str | os.PathLike | None,
    dst: str | os.PathLike,
    *,
    tokenizer: bool = True,
    chat_template: str | None = None,
) -> None:
    """Copy the asset files of ``src`` into the empty folder ``dst`` as a merge's output
    should carry them: without the tokenizer's files unless ``tokenizer`` (the
    generation config stays), and with ``chat_template`` as the tokenizer's only
    template (in ``chat_template.jinja``, none left in ``tokenizer_config.json`` or
    ``chat_template.json``), as transformers 5's ``save_pretrained`` writes a template
    set on a tokenizer (mergekit 0.1.5's ``chat_template``)."""
    dst = storage.path(dst)
    for f in asset_files(src):
        if f.name != GENERATION_CONFIG and not tokenizer:
            continue
        if chat_template is not None and f.name in (CHAT_TEMPLATE, PROCESSOR_CHAT_TEMPLATE):
            continue
        storage.copy_file(f, dst / f.name)
    if not tokenizer or chat_template is None:
        return
    (dst / CHAT_TEMPLATE).write_text(chat_template, encoding="utf-8")
    config_path = dst / TOKENIZER_CONFIG
    if config_path.is_file():
        cfg = read_json(config_path)
        if cfg.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
