"""Tiny random Hugging Face models built inside the tests (no downloads).

Sizes are small primes where a size is free, so a transposed or mixed-up
dimension cannot go unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

VOCAB = 101

# name -> (config class, kwargs); each is one case the parity tests must cover.
CASES = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama_bias_headdim": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=10, attention_bias=True),
    ),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling=dict(rope_type="linear", factor=3.0),
        ),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mistral": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    ),
    "qwen2_bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2_tied_window": (
        "Qwen2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    # The families beyond Llama (see dem_jax.io.hf.families): sizes small, caps low and
    # windows short. At random init some switches (Gemma 2's attention cap, Phi-3's
    # partial rotary) move the logits by less than the parity tolerance: the test that
    # each switch matters scales the weights first (test_families.py).
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12)),
    "qwen3_tied_window": (
        "Qwen3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            query_pre_attn_scalar=16,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    "phi3": (
        "Phi3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=5,
            pad_token_id=0,
            eos_token_id=2,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.6,
            },
        ),
    ),
    "phi3_longrope": (
        "Phi3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=2,
            original_max_position_embeddings=8,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.5, 2.0, 3.0, 4.0],
                "long_factor": [2.0, 3.0, 5.0, 8.0, 13.0],
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "olmo2": (
        "Olmo2Config",
        dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2),
    ),
    # Mixtures of experts: 5 experts, 2 per token, so routing decides what each token gets.
    "mixtral": (
        "MixtralConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=5,
            num_experts_per_tok=2,
            sliding_window=6,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
        ),
    ),
}
# The families each dense case stands for (tests/test_families.py runs one per family).
FAMILY_CASES = {
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "olmo2": "olmo2",
}


def hf_config(case: str, **overrides):
    """A transformers config for one of CASES."""
    import transformers

    cls_name, kwargs = CASES[case]
    base = dict(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=3,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    return getattr(transformers, cls_name)(**{**base, **kwargs, **overrides})


def build_hf_model(case: str, seed: int = 0, dtype=None, **overrides):
    """A random transformers model; norms and biases perturbed so they matter."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(case, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A tiny word-level fast tokenizer with ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)


def save_hf_model(
    case: str, directory: Path, seed: int = 0, dtype=None, tokenizer=True, **overrides
):
    """Build, save_pretrained into ``directory`` (with a tokenizer) and return the model."""
    model = build_hf_model(case, seed, dtype, **overrides)
    model.save_pretrained(directory)
    if tokenizer:
        save_tokenizer(directory)
    return model


def random_tokens(batch: int = 2, length: int = 11, seed: int = 0) -> np.ndarray:
    """Token ids in range for VOCAB."""
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
    """float32 logits from a transformers model."""
    import torch

    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens)), **kwargs).logits
    return out.float().numpy()


# transformers 5 holds a mixture of experts' weights fused per layer (experts.gate_up_proj
# (E, 2F, D), experts.down_proj (E, D, F), the router as mlp.gate); checkpoints, and so
# dem-jax (and its exports), name one tensor per expert.
FUSED_EXPERTS = re.compile(
    r"(model\.layers\.\d+\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$"
)


def per_expert_tensors(tensors: dict[str, np.ndarray], mixtral: bool) -> dict[str, np.ndarray]:
    """Fused expert tensors (transformers 5 in memory, mergekit 0.1.5's outputs) under
    the per-expert checkpoint names: Mixtral's ``block_sparse_moe.experts.{j}.w1/w3/w2``,
    else Qwen3-MoE's ``mlp.experts.{j}.gate_proj/up_proj/down_proj``."""
    prefix, gate, up, down = (
        ("block_sparse_moe", "w1", "w3", "w2")
        if mixtral
        else ("mlp", "gate_proj", "up_proj", "down_proj")
    )
    out = {}
    for name, t in tensors.items():
        m = FUSED_EXPERTS.match(name)
        if m is None:
            out[name] = t
        elif m.group(2) == "gate.weight":
            out[f"{m.group(1)}{prefix}.gate.weight"] = t
        elif m.group(2) == "experts.down_proj":
            for j in range(len(t)):
                out[f"{m.group(1)}{prefix}.experts.{j}.{down}.weight"] = t[j]
        else:
            f = t.shape[1] // 2
            for j in range(len(t)):
                out[f"{m.group(1)}{prefix}.experts.{j}.{gate}.weight"] = t[j, :f]
                out[f"{m.group(1)}{prefix}.experts.{j}.{up}.weight"] = t[j, f:]
    return out
