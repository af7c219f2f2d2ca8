"""Records, tokenisation, loss masks and packing."""

import jax
import numpy as np
import pytest
from hf_models import save_tokenizer

import dem_jax
from dem_jax.data.packing import make_rows, stack_rows
from dem_jax.data.records import read_jsonl, split_validation
from dem_jax.data.tokenize import Encoding, encode_record, load_tokenizer
from dem_jax.errors import DemError
from dem_jax.model.losses import batch_nll, masked_nll_sum


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(directory)
    return load_tokenizer(directory)


def test_masked_loss_matches_hand_computation():
    logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], [[1.0, 1.0, 1.0], [0.0, 4.0, 0.0]]])
    targets = np.array([[0, 2], [1, 1]])
    mask = np.array([[1.0, 0.0], [1.0, 1.0]])
    # By hand: -log softmax at the targets of the three unmasked positions.
    nll_00 = -(2.0 - np.log(np.exp(2.0) + np.exp(0.0) + np.exp(-1.0)))
    nll_10 = -(1.0 - np.log(3 * np.exp(1.0)))
    nll_11 = -(4.0 - np.log(2 + np.exp(4.0)))
    total, count = masked_nll_sum(logits, targets, mask)
    assert float(count) == 3.0
    np.testing.assert_allclose(float(total), nll_00 + nll_10 + nll_11, rtol=1e-6)


def test_text_and_prompt_completion_encoding(tokenizer):
    text = encode_record(tokenizer, {"text": "w5 w7"})
    np.testing.assert_array_equal(text.ids, [1, 5, 7, 2])
    np.testing.assert_array_equal(text.loss_mask, [False, True, True, True])
    pc = encode_record(
        tokenizer, {"prompt": "w9", "completion": "w4 w6"}, template="w3 {prompt} w8"
    )
    np.testing.assert_array_equal(pc.ids, [1, 3, 9, 8, 4, 6, 2])
    np.testing.assert_array_equal(pc.loss_mask, [0, 0, 0, 0, 1, 1, 1])


def test_rows_targets_and_masks():
    enc = Encoding(np.array([1, 10, 11, 12, 2]), np.array([0, 0, 1, 1, 1], bool))
    (row,) = make_rows([enc], seq_len=6)
    np.testing.assert_array_equal(row["tokens"], [1, 10, 11, 12, 0, 0])
    np.testing.assert_array_equal(row["targets"], [10, 11, 12, 2, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 0])


def test_long_document_is_split_with_every_target_once():
    enc = Encoding(np.arange(1, 12), np.ones(11, bool))  # 10 targets
    rows = make_rows([enc], seq_len=4, packing=False)
    assert len(rows) == 3
    targets = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in rows])
    np.testing.assert_array_equal(targets, np.arange(2, 12))


def test_packed_loss_equals_documents_one_by_one():
    config = dem_jax.ModelConfig(
        vocab_size=37,
        hidden_size=24,
        intermediate_size=40,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    params = dem_jax.init_model(config, seed=4).params
    rng = np.random.default_rng(0)
    encodings = [
        Encoding(rng.integers(0, 37, n).astype(np.int32), rng.random(n) < 0.7)
        for n in (5, 9, 3, 7, 12)
    ]
    packed = make_rows(encodings, seq_len=16, packing=True)
    alone = make_rows(encodings, seq_len=16, packing=False)
    assert len(packed) < len(alone) == 5
    fn = jax.jit(batch_nll, static_argnums=1)
    p_sum, p_count = fn(params, config, stack_rows(packed))
    a_sum, a_count = fn(params, config, stack_rows(alone))
    assert float(p_count) == float(a_count) > 0
    np.testing.assert_allclose(float(p_sum), float(a_sum), rtol=1e-5)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DemError, match=r"d\.jsonl:3: malformed JSON"):
        read_jsonl(path)
    path.write_text('{"text": "a"}\n{"prompt": "x"}\n')
    with pytest.raises(DemError, match=r"d\.jsonl:2: needs a 'text' field"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(DemError, match="no records"):
        read_jsonl(path)


def test_validation_split_is_deterministic(tmp_path):
    records = [{"text": str(i)} for i in range(20)]
    train, val = split_validation(records, 0.25, seed=3, where="x")
    assert len(val) == 5 and len(train) == 15
    assert split_validation(records, 0.25, seed=3, where="x") == (train, val)
    assert {r["text"] for r in train} | {r["text"] for r in val} == {str(i) for i in range(20)}


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DemError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
