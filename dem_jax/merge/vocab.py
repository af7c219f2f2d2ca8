"""Merging models whose vocabularies differ: mergekit's ``tokenizer_source`` and
``tokenizer:`` section (mergekit 0.1.5 ``tokenizer/build.py``, ``tokenizer/embed.py``).

The output gets a tokenizer: ``union`` (the base's, plus every token another model
has), ``base``, or a named model's. Every input's vocabulary tensors (the embedding,
and ``lm_head`` when untied: one row per token) are then re-indexed to the output's
tokens before the merge method sees them. A token a model lacks gets a row from
elsewhere, by mergekit's rule unless ``tokenizer.tokens`` says otherwise:

* present in exactly one input: that input's row;
* in none: zeros;
* in the base: the base's row;
* otherwise the mean of the rows of the inputs that have it.

``tokens: {TOKEN: {source: ..., force: bool}}`` names the source of one token's
default row: a model (its row for that token), ``{kind: zero}``, or ``{kind:
model_token, model: M, token_id: I | token: T}`` (M's row ``I``, or its row of token
``T``); with ``force`` every input takes that row, even one that has the token.
``pad_to_multiple_of`` rounds the row count up, the padding rows being each input's
mean row. The merged model's ``vocab_size`` is the new row count.

Where the vocabulary is one and the same for every input (the usual case) nothing is
re-indexed and the engines merge as before. Otherwise the merge runs on the host
executor (:mod:`dem_jax.merge.host`). Deterministic where mergekit is not: mergekit
walks its models as a ``set`` and each vocabulary in hash order, so the ids of added
tokens vary from run to run there; here tokens are added in YAML order, by id.
Tokenizers are loaded with ``transformers.AutoTokenizer``, as mergekit does, so the
output tokenizer is the one mergekit would build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # rows = tokens


@dataclass(frozen=True)
class TokenSource:
    """Where one token's default row comes from."""

    kind: str  # "model" (its row for this token), "model_token" or "zero"
    model: Path | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenSetting:
    """``tokenizer.tokens`` entry."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class VocabularySpec:
    """What the YAML asks for: the output tokenizer's source ("union", or a model
    path: the base or another) and the per-token settings."""

    source: str | Path
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


# ------------------------------------------------------------------ parsing the YAML


def vocabulary_spec(
    tokenizer_source: str | None,
    section: Mapping[str, Any] | None,
    base: Path | None,
    inputs: Sequence[Path],
    resolve,
) -> VocabularySpec | None:
    """The spec of ``tokenizer_source`` or the ``tokenizer:`` section (not both, as in
    mergekit); ``resolve(value, where)`` turns a model reference into a path, which
    must be one of the merge's ``inputs``."""
    if tokenizer_source is not None and section is not None:
        raise DemError("give tokenizer_source or a tokenizer section, not both")
    if section is None:
        if tokenizer_source is None:
            return None
        return VocabularySpec(_source(tokenizer_source, base, resolve, "tokenizer_source"))
    if not isinstance(section, Mapping):
        raise DemError("tokenizer: expected a mapping (source, tokens, pad_to_multiple_of)")
    unknown = sorted(set(section) - {"source", "tokens", "pad_to_multiple_of"})
    if unknown:
        raise DemError(
            f"tokenizer: unknown key {unknown[0]!r} (source, tokens, pad_to_multiple_of)"
        )
    pad = section.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise DemError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = section.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise DemError("tokenizer.tokens: expected a mapping of token to {source, force}")
    known = {p.resolve() for p in inputs}
    settings = {
        str(tok): _setting(cfg, f"tokenizer.tokens[{tok!r}]", base, known, resolve)
        for tok, cfg in tokens.items()
    }
    source = _source(section.get("source", "union"), base, resolve, "tokenizer.source")
    return VocabularySpec(source, settings, pad)


def _source(value: Any, base: Path | None, resolve, where: str) -> str | Path:
    if value == "union":
        return "union"
    if value == "base":
        if base is None:
            raise DemError(f"{where}: 'base' needs a base_model")
        return base
    if not isinstance(value, str):
        raise DemError(f"{where}: expected 'union', 'base' or a model path, got {value!r}")
    return resolve(value, where)


def _setting(cfg: Any, where: str, base, known: set, resolve) -> TokenSetting:
    if not isinstance(cfg, Mapping) or set(cfg) - {"source", "force"}:
        raise DemError(f"{where}: expected a mapping with source and/or force")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise DemError(f"{where}.force: must be true or false, got {force!r}")
    src = cfg.get("source")
    if src is None:
        return TokenSetting(None, force)
    if isinstance(src, str):
        return TokenSetting(TokenSource("model", _input(src, where, base, known, resolve)), force)
    if not isinstance(src, Mapping) or src.get("kind") not in ("zero", "model_token"):
        raise DemError(
            f"{where}.source: expected a model path, {{kind: zero}} or {{kind: model_token, "
            f"model, token_id | token}}, got {src!r}"
        )
    if src["kind"] == "zero":
        return TokenSetting(TokenSource("zero"), force)
    if ("token_id" in src) == ("token" in src):
        raise DemError(f"{where}.source: give one of token_id or token")
    model = _input(src.get("model"), f"{where}.source.model", base, known, resolve)
    tid = src.get("token_id")
    if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
        raise DemError(f"{where}.source.token_id: expected a non-negative integer, got {tid!r}")
    return TokenSetting(TokenSource("model_token", model, tid, src.get("token")), force)


def _input(value: Any, where: str, base, known: set, resolve) -> Path:
    if value == "base" and base is not None:
        return base
    if not isinstance(value, str):
        raise DemError(f"{where}: expected a model path, got {value!r}")
    path = resolve(value, where)
    if path.resolve() not in known:
        raise DemError(f"{where}: {value!r} is not one of the merge's models")
    return path


# ------------------------------------------------------------------ building it


@dataclass
class Vocabulary:
    """The output tokenizer and, per input, the input row of each output token."""

    tokenizer: Any  # a transformers tokenizer
    vocab: dict[str, int]  # output token -> output row
    size: int  # output rows (len(vocab), padded)
    rows: dict[Path, np.ndarray]  # input -> (len(vocab),) its row per token, -1 if none
    original: dict[Path, dict[str, int]]  # each input's own vocabulary
    spec: VocabularySpec
    base: Path | None  # the YAML's base_model: the donor of tokens it has
    sizes: dict[Path, int]  # each input's vocab_size (rows)

    def is_identity(self) -> bool:
        """Whether every input already has exactly these rows (nothing to re-index)."""
        ident = np.arange(len(self.vocab))
        return all(
            n == self.size == len(self.vocab) and np.array_equal(self.rows[p], ident)
            for p, n in self.sizes.items()
        )


def build_vocabulary(spec: VocabularySpec, base: Path | None, models: Sequence[Path]) -> Vocabulary:
    """The output tokenizer and every input's row map (transformers, imported here)."""
    from transformers import AutoTokenizer

    inputs = list({p.resolve(): p for p in [*([base] if base else []), *models]}.values())
    ref = inputs[0]  # mergekit: the base model, else the first model
    sizes = {p: _vocab_size(p) for p in inputs}
    tokenizers = {}
    for p in inputs:
        try:
            tokenizers[p] = AutoTokenizer.from_pretrained(str(storage.local_copy(p)))
        except Exception as e:  # transformers raises many types; an unreadable one is fatal
            if p == ref:
                raise DemError(f"{p}: cannot load its tokenizer ({e})") from None
    for p, tok in tokenizers.items():
        if len(tok) > sizes[p]:
            raise DemError(
                f"{p}: its tokenizer has {len(tok)} tokens but vocab_size is {sizes[p]} "
                "(tokens beyond the embedding cannot be merged)"
            )
    if spec.source == "union":
        out = _union(ref, tokenizers, sizes)
    else:
        out = AutoTokenizer.from_pretrained(str(storage.local_copy(spec.source)))
    vocab = dict(sorted(out.get_vocab().items(), key=lambda kv: kv[1]))
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    original = {p: (tokenizers.get(p) or tokenizers[ref]).get_vocab() for p in inputs}
    rows = {}
    for p in inputs:  # a model without a tokenizer is taken to have the base's (mergekit)
        own = original[p]
        r = np.full(len(vocab), -1, np.int64)
        for tok, i in vocab.items():
            j = own.get(tok)
            if j is not None and j < sizes[p]:
                r[i] = j
        rows[p] = r
    return Vocabulary(out, vocab, size, rows, original, spec, base, sizes)


def _vocab_size(path: Path) -> int:
    cfg = json.loads((storage.path(path) / "config.json").read_text())
    return int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size"))


def _union(ref: Path, tokenizers: Mapping[Path, Any], sizes: Mapping[Path, int]):
    """The base's tokenizer plus, in input order, every token another input has
    (mergekit's ``build_union_tokenizer``; added tokens keep their first settings)."""
    from transformers import AutoTokenizer

    tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for p, tok in tokenizers.items():
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < sizes[p]:
                tokens.setdefault(t)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < sizes[p]:
                added.setdefault(info.content, info)
    out = AutoTokenizer.from_pretrained(str(storage.local_copy(ref)))  # a fresh copy
    base_vocab = tokenizers[ref].get_vocab()
    for t in tokens:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


# ------------------------------------------------------------------ re-indexing rows


def align_rows(voc: Vocabulary, tensors: Sequence[tuple[Path, np.ndarray]]) -> list[np.ndarray]:
    """Each input's vocabulary tensor (rows = its tokens) re-indexed to the output's
    tokens (``PermutedVocabulary``); ``tensors`` in mergekit's order (the models as the
    YAML lists them, then an unlisted base), float32."""
    models = [p for p, _ in tensors]
    n_tok = len(voc.vocab)
    present = np.stack([voc.rows[p] >= 0 for p in models])  # (models, tokens)
    settings = dict(voc.spec.tokens)
    averaged = np.zeros(n_tok, bool)
    base = voc.base
    for tok, i in voc.vocab.items():
        if tok in settings:
            continue
        have = present[:, i]
        if have.sum() == 1:
            settings[tok] = TokenSetting(TokenSource("model", models[int(np.argmax(have))]))
        elif not have.any():
            settings[tok] = TokenSetting(TokenSource("zero"))
        elif base is not None and base in models and have[models.index(base)]:
            settings[tok] = TokenSetting(TokenSource("model", base))
        else:
            averaged[i] = True
    shape = tensors[0][1].shape[1:]
    defaults: dict[int, tuple[np.ndarray, bool]] = {}  # output row -> (row, forced)
    for tok, i in voc.vocab.items():
        cfg = settings.get(tok)
        forced = bool(cfg and cfg.force)
        if not forced and present[:, i].all():
            continue
        if averaged[i]:
            have = [x[voc.rows[p][i]] for p, x in tensors if voc.rows[p][i] >= 0]
            total = have[0].copy()
            for row in have[1:]:
                total += row
            defaults[i] = (total / np.float32(len(have)), forced)
        elif cfg is not None and cfg.source is not None:
            defaults[i] = (_default_row(voc, dict(tensors), tok, i, cfg.source, shape), forced)
    out = []
    for p, x in tensors:
        r = voc.rows[p]
        new = np.zeros((voc.size, *shape), np.float32)
        own = r >= 0
        new[:n_tok][own] = x[r[own]]
        for i, (row, forced) in defaults.items():
            if forced or r[i] < 0:
                new[i] = row
        if voc.size > n_tok:  # padding rows: the mean row (vocabulary expansion advice)
            new[n_tok:] = new[:n_tok].mean(axis=0)
        out.append(new)
    return out


def _default_row(voc, tensors, tok: str, i: int, src: TokenSource, shape) -> np.ndarray:
    if src.kind == "zero":
        return np.zeros(shape, np.float32)
    if src.model not in tensors:
        raise DemError(f"tokenizer.tokens[{tok!r}]: {src.model} is not among this tensor's inputs")
    x = tensors[src.model]
    if src.kind == "model":
        j = voc.rows[src.model][i]
        if j < 0:
            raise DemError(f"tokenizer.tokens[{tok!r}]: {src.model} has no token {tok!r}")
        return x[j]
    j = src.token_id
    if j is None:
        j = voc.original[src.model].get(src.token)
        if j is None:
            raise DemError(f"tokenizer.tokens[{tok!r}]: {src.model} has no token {src.token!r}")
    if not 0 <= j < x.shape[0]:
        raise DemError(f"tokenizer.tokens[{tok!r}]: token id {j} is out of range for {src.model}")
    return x[j]
