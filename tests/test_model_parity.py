"""Logits parity against the transformers (PyTorch) reference implementation."""

import numpy as np
import pytest
from hf_models import CASES, VOCAB, random_tokens, save_hf_model, torch_logits

import dem_jax

TOL = 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = save_hf_model(case, tmp_path)
    model = dem_jax.load_model(tmp_path)
    tokens = random_tokens(2, 11)
    ours = np.asarray(dem_jax.forward(model, tokens))
    ref = torch_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, 11, VOCAB)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["llama_gqa", "mistral", "qwen2_bias"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(case, side, tmp_path):
    hf = save_hf_model(case, tmp_path)
    model = dem_jax.load_model(tmp_path)
    tokens = random_tokens(3, 11, seed=1)
    lengths = np.array([11, 7, 4])
    idx = np.arange(11)
    if side == "right":
        mask = (idx[None] < lengths[:, None]).astype(np.int64)
    else:
        mask = (idx[None] >= 11 - lengths[:, None]).astype(np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ours = np.asarray(dem_jax.forward(model, tokens, attention_mask=mask, positions=positions))
    ref = torch_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)
    # Each row must also equal that row run alone without padding.
    for row in range(len(lengths)):
        keep = tokens[row][valid[row]][None]
        alone = torch_logits(hf, keep)
        np.testing.assert_allclose(ours[row][valid[row]], alone[0], atol=TOL, rtol=0)


def test_sliding_window_changes_logits(tmp_path):
    """The Mistral case must really exercise the window, or its parity proves little."""
    save_hf_model("mistral", tmp_path)
    model = dem_jax.load_model(tmp_path)
    tokens = random_tokens(1, 11)
    windowed = np.asarray(dem_jax.forward(model, tokens))
    model.config = model.config.replace(sliding_windows=None)
    full = np.asarray(dem_jax.forward(model, tokens))
    np.testing.assert_allclose(windowed[:, :5], full[:, :5], atol=1e-6)
    assert np.abs(windowed[:, 5:] - full[:, 5:]).max() > 1e-3


def test_rope_scaling_changes_logits(tmp_path):
    save_hf_model("llama3_rope", tmp_path)
    model = dem_jax.load_model(tmp_path)
    tokens = random_tokens(1, 11)
    scaled = np.asarray(dem_jax.forward(model, tokens))
    model.config = model.config.replace(rope_scaling=dem_jax.RopeScaling())
    plain = np.asarray(dem_jax.forward(model, tokens))
    assert np.abs(scaled - plain).max() > 1e-3


def test_packed_segments_equal_separate_documents(tmp_path):
    """Two documents packed in one row never see each other."""
    save_hf_model("llama_gqa", tmp_path, tokenizer=False)
    model = dem_jax.load_model(tmp_path)
    a, b = random_tokens(1, 6, seed=2), random_tokens(1, 5, seed=3)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 6 + [2] * 5])
    out = np.asarray(dem_jax.forward(model, packed, segment_ids=segments))
    np.testing.assert_allclose(out[:, :6], np.asarray(dem_jax.forward(model, a)), atol=1e-5)
    np.testing.assert_allclose(out[:, 6:], np.asarray(dem_jax.forward(model, b)), atol=1e-5)


def test_bfloat16_compute_is_close(tmp_path):
    hf = save_hf_model("llama_gqa", tmp_path, tokenizer=False)
    model = dem_jax.load_model(tmp_path)
    model.config = model.config.replace(dtype="bfloat16")
    tokens = random_tokens(2, 11)
    ours = np.asarray(dem_jax.forward(model, tokens))
    ref = torch_logits(hf, tokens)
    assert np.isfinite(ours).all()
    # bfloat16 has ~3 significant digits; the logits are O(1).
    assert np.abs(ours - ref).max() < 0.1
    assert np.abs(ours - ref).max() > 0  # really computed in a different dtype
