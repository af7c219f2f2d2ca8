"""Greedy decoding with a KV cache against transformers' generate and a cache-free loop."""

import numpy as np
import pytest
import torch
from hf_models import save_hf_model

import dem_jax
from dem_jax.model import transformer as model_lib
from dem_jax.model.generate import answer_accuracy, greedy_generate, left_pad


@pytest.mark.parametrize("case", ["llama_gqa", "mistral", "qwen2_tied_window"])
def test_greedy_matches_transformers_generate(case, tmp_path):
    hf = save_hf_model(case, tmp_path, tokenizer=False)
    assert_greedy_matches_generate(dem_jax.load_model(tmp_path), hf)


def assert_greedy_matches_generate(model, hf) -> None:
    """dem-jax's KV-cache greedy decoding of three left-padded prompts equals
    transformers' ``generate`` token for token."""
    prompts = [[5, 17, 33, 8, 2, 9], [44, 3], [7, 7, 19, 60]]
    tokens, mask = left_pad(prompts, pad_id=0)
    ours = np.asarray(greedy_generate(model.params, model.config, tokens, mask, 8, -1))
    ref = hf.generate(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, tokens.shape[1] :].numpy()
    np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_full_recompute(tmp_path):
    config = dem_jax.ModelConfig(
        vocab_size=41,
        hidden_size=24,
        intermediate_size=40,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        sliding_windows=(3, None),
        architecture="qwen2",
        qkv_bias=True,
    )
    params = dem_jax.init_model(config, seed=5).params
    prompt = [3, 9, 27, 4, 11]
    tokens, mask = left_pad([prompt], 0)
    ours = np.asarray(greedy_generate(params, config, tokens, mask, 6, -1))[0].tolist()
    seq = list(prompt)
    for _ in range(6):  # no cache: re-run the whole sequence each step
        logits = model_lib.apply(params, config, np.asarray([seq]))
        seq.append(int(np.argmax(logits[0, -1])))
    assert ours == seq[len(prompt) :]


def test_eos_stops_a_row(tmp_path):
    config = dem_jax.ModelConfig(
        vocab_size=13,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
    )
    params = dem_jax.init_model(config, seed=0).params
    tokens, mask = left_pad([[1, 2, 3]], 0)
    free = np.asarray(greedy_generate(params, config, tokens, mask, 5, -1))[0]
    eos = int(free[1])  # make the second generated token the EOS
    out = np.asarray(greedy_generate(params, config, tokens, mask, 5, eos))[0]
    assert out[0] == free[0] and (out[1:] == eos).all()


def test_answer_accuracy_counts_exact_matches(tmp_path):
    from dem_jax.data.tokenize import load_tokenizer
    from dem_jax.demo.synthetic import write_char_tokenizer

    tok = load_tokenizer(write_char_tokenizer(tmp_path / "tok"))
    config = dem_jax.ModelConfig(
        vocab_size=55,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
    )
    params = dem_jax.init_model(config, seed=1).params
    records = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "reverse ab:", "answer": "ba"}]
    result = answer_accuracy(params, config, tok, records, max_new_tokens=4, batch_size=4)
    assert result["count"] == 2 and len(result["outputs"]) == 2
    # Score the model's own outputs as answers: every one must then count as correct.
    echoed = [dict(r, answer=o) for r, o in zip(records, result["outputs"], strict=True)]
    assert (
        answer_accuracy(params, config, tok, echoed, max_new_tokens=4, batch_size=4)["accuracy"]
        == 1.0
    )
