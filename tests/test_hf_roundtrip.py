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
    # Every source field kept; transformers 5 wrote the rope in `rope_parameters` only,
    # so the export adds the 4.x keys (4.x would otherwise use rope_theta 10000), and
    # token ids the config leaves null come from the tokenizer (<s> = 1, </s> = 2).
    src_config = json.loads((src / "config.json").read_text())
    rope = src_config["rope_parameters"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    tokenizer_ids = {"bos_token_id": 1, "eos_token_id": 2}
    assert json.loads((back / "config.json").read_text()) == {
        **src_config,
        **{k: v for k, v in tokenizer_ids.items() if src_config.get(k) is None},
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else scaling,
    }
    assert (src / "tokenizer.json").read_bytes() == (back / "tokenizer.json").read_bytes()
    # generation_config.json as the source wrote it, with the ids it lacked (so that
    # generate() stops at EOS) taken from the exported config.
    gen_src = json.loads((src / "generation_config.json").read_text())
    back_config = json.loads((back / "config.json").read_text())
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    filled = {
        k: back_config[k] for k in ids if gen_src.get(k) is None and back_config.get(k) is not None
    }
    assert json.loads((back / "generation_config.json").read_text()) == {**gen_src, **filled}
    # The tokenizer config too, but for transformers' 1e30 "no limit" placeholder and
    # its 5.x-only class name.
    tok_src = json.loads((src / "tokenizer_config.json").read_text())
    tok_back = json.loads((back / "tokenizer_config.json").read_text())
    assert tok_src.pop("model_max_length") > 1e29
    assert tok_back.pop("model_max_length") == src_config["max_position_embeddings"]
    assert tok_back == {**tok_src, "tokenizer_class": "PreTrainedTokenizerFast"}


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
