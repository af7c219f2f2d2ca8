"""Hugging Face -> dem-jax -> Hugging Face conversion."""

import json

import numpy as np
import pytest
import torch
import transformers
from hf_models import random_tokens, save_hf_model, torch_logits
from safetensors.torch import load_file

import dem_jax
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint


def raw_tensors(directory):
    """name -> (dtype, raw bytes) of every tensor, via the safetensors library."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        for name, t in load_file(f).items():
            out[name] = (t.dtype, t.contiguous().view(torch.uint8).numpy().tobytes(), t.shape)
    return out


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2_tied_window", "llama3_rope", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(case, dtype, tmp_path):
    src, mid, back = tmp_path / "src", tmp_path / "orbax", tmp_path / "back"
    save_hf_model(case, src, dtype=dtype)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "top_k": 7}))
    dem_jax.save_model(dem_jax.load_model(src), mid, format="orbax")
    dem_jax.save_model(dem_jax.load_model(mid), back, format="hf")

    assert raw_tensors(src) == raw_tensors(back)
    assert json.loads((src / "config.json").read_text()) == json.loads(
        (back / "config.json").read_text()
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (src / name).read_bytes() == (back / name).read_bytes(), name


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    src, mid, back = tmp_path / "src", tmp_path / "orbax", tmp_path / "back"
    hf = save_hf_model("qwen2_bias", src)
    dem_jax.save_model(dem_jax.load_model(src), mid, format="orbax")
    dem_jax.save_model(dem_jax.load_model(mid), back, format="hf", max_shard_bytes=20_000)
    assert (back / "model.safetensors.index.json").is_file()
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    tokens = random_tokens(2, 9)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(hf, tokens))
    tok = transformers.AutoTokenizer.from_pretrained(back)
    tok_src = transformers.AutoTokenizer.from_pretrained(src)
    assert type(tok) is type(tok_src)
    assert len(tok) == len(tok_src)
    assert tok("w5 w7 hello")["input_ids"] == tok_src("w5 w7 hello")["input_ids"]


def test_model_from_scratch_exports_loadable_config(tmp_path):
    """A model dem-jax created itself (no source config.json) still exports to HF."""
    config = dem_jax.ModelConfig(
        vocab_size=53,
        hidden_size=24,
        intermediate_size=40,
        num_layers=2,
        num_heads=6,
        num_kv_heads=3,
        architecture="mistral",
        sliding_windows=(4, 4),
        tie_embeddings=True,
    )
    model = dem_jax.init_model(config, seed=3)
    dem_jax.save_model(model, tmp_path / "hf", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MistralForCausalLM"
    tokens = np.random.default_rng(0).integers(0, 53, (2, 9))
    np.testing.assert_allclose(
        np.asarray(dem_jax.forward(model, tokens)), torch_logits(hf, tokens), atol=1e-4
    )


def test_reads_transformers_4x_config(tmp_path):
    """Most published checkpoints have rope_theta / rope_scaling at the top level."""
    hf = save_hf_model("llama3_rope", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = dem_jax.load_model(tmp_path)
    assert model.config.rope_theta == 500000.0
    assert model.config.rope_scaling.rope_type == "llama3"
    tokens = random_tokens(1, 11)
    np.testing.assert_allclose(
        np.asarray(dem_jax.forward(model, tokens)), torch_logits(hf, tokens), atol=1e-4
    )
    dem_jax.save_model(model, tmp_path / "out", format="hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == cfg


def test_dtype_is_kept_unless_asked(tmp_path):
    save_hf_model("llama_gqa", tmp_path / "src", dtype=torch.bfloat16)
    model = dem_jax.load_model(tmp_path / "src")
    assert model.config.param_dtype == "bfloat16"
    assert model.params["layers"]["attn"]["q_proj"]["kernel"].dtype == "bfloat16"
    dem_jax.save_model(model, tmp_path / "f32", format="hf", dtype="float32")
    with SafetensorsCheckpoint(tmp_path / "f32") as ckpt:
        assert {str(ckpt.dtype(k)) for k in ckpt} == {"float32"}
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    as_f32 = dem_jax.load_model(tmp_path / "src", dtype="float32")
    assert as_f32.params["embed"]["embedding"].dtype == "float32"
