"""Greedy decoding with a KV cache, and exact-match accuracy on checkable answers.

Prompts are left-padded into one (B, P) batch; the whole generation (prefill
plus ``max_new_tokens`` cached decode steps) is one jitted program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax.config.model import ModelConfig
from dem_jax.model.transformer import bind, init_cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def greedy_generate(params, config: ModelConfig, tokens, mask, max_new_tokens: int, eos_id: int):
    """Greedy continuation of left-padded prompts.

    tokens, mask: (B, P) int; mask 1 = prompt token, 0 = padding (left side).
    Returns (B, max_new_tokens) int32; after a row emits ``eos_id`` it keeps
    emitting ``eos_id``.
    """
    model = bind(config, params)
    batch, prompt_len = tokens.shape
    cache = init_cache(config, batch, prompt_len + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model(tokens, positions, mask.astype(jnp.int32), cache)
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # (B,)
    next_pos = positions[:, -1] + 1

    def step(carry, _):
        token, pos, done, cache = carry
        token = jnp.where(done, eos_id, token)
        done = done | (token == eos_id)
        logits, cache = model(token[:, None], pos[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, pos + 1, done, cache), token

    done = jnp.zeros((batch,), bool)
    _, out = jax.lax.scan(step, (next_token, next_pos, done, cache), None, length=max_new_tokens)
    return out.T  # (B, max_new_tokens)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) arrays, each row right-aligned."""
    width = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return tokens, mask


def answer_accuracy(
    params,
    config: ModelConfig,
    tokenizer,
    records: list[dict[str, Any]],
    template: str = "{prompt}",
    max_new_tokens: int = 16,
    batch_size: int = 32,
    add_bos: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on records with ``prompt`` and ``answer``.

    The generated text up to EOS, stripped of surrounding whitespace, must equal
    the stripped answer. Batches are padded to ``batch_size`` so one program
    serves every batch.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    prompts = [
        bos
        + list(
            tokenizer(template.format(prompt=r["prompt"]), add_special_tokens=False)["input_ids"]
        )
        for r in records
    ]
    width = max(len(p) for p in prompts)
    correct, outputs = 0, []
    for start in range(0, len(records), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static batch shape
        tokens, mask = left_pad(chunk, pad)
        if tokens.shape[1] < width:  # static prompt width too
            extra = width - tokens.shape[1]
            tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad)
            mask = np.pad(mask, ((0, 0), (extra, 0)))
        generated = np.asarray(
            greedy_generate(
                params, config, tokens, mask, max_new_tokens, -1 if eos is None else eos
            )
        )
        for i, record in enumerate(records[start : start + batch_size]):
            ids = generated[i].tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            outputs.append(text)
            correct += text == str(record["answer"]).strip()
    return {"accuracy": correct / len(records), "count": len(records), "outputs": outputs}
