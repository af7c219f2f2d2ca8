"""Per-distribution evaluation of every model: perplexity on held-out data and,
where records carry an ``answer``, greedy exact-match accuracy."""

from __future__ import annotations

from typing import Any

from dem_jax.config.run import RunConfig
from dem_jax.io.modeldir import Model
from dem_jax.model.generate import answer_accuracy
from dem_jax.search.score import score_model


def has_answers(records: list[dict[str, Any]]) -> bool:
    """Whether a distribution's records can be checked by exact match."""
    return bool(records) and all("answer" in r and "prompt" in r for r in records)


def evaluate_model(
    model: Model,
    cfg: RunConfig,
    val_records: dict[str, list[dict[str, Any]]],
    tokenizer,
    mesh=None,
) -> dict[str, dict[str, Any]]:
    """{distribution: {"nll", "ppl", "tokens", "bits_per_byte", ["accuracy"]}}."""
    d, p = cfg.data, cfg.pipeline
    scores = score_model(
        model,
        val_records,
        tokenizer,
        batch_size=cfg.search.batch_size,
        seq_len=d.seq_len,
        mesh=mesh,
        packing=True,  # data.packing is for training; scoring sums are the same packed
        template=d.prompt_template,
        add_bos=d.add_bos,
        add_eos=d.add_eos,
    )
    out: dict[str, dict[str, Any]] = {}
    for name, score in scores.items():
        out[name] = {
            "nll": score.mean_nll,
            "ppl": score.perplexity,
            "tokens": score.tokens,
            "bits_per_byte": score.bits_per_byte,
        }
        records = val_records[name][: p.eval_max_examples]
        if p.answer_eval and has_answers(records):
            result = answer_accuracy(
                model.params,
                model.config,
                tokenizer,
                records,
                d.prompt_template,
                p.max_new_tokens,
                batch_size=32,
                add_bos=d.add_bos,
            )
            out[name]["accuracy"] = result["accuracy"]
            out[name]["answered"] = result["count"]
    return out
