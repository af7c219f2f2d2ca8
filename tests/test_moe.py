"""Mixtures of experts (Mixtral, Qwen3-MoE) against transformers, mergekit and by hand.

Logits of both families are also in test_model_parity (tests/hf_models.py CASES).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from hf_models import per_expert_tensors, random_tokens, save_hf_model, torch_logits
from safetensors.numpy import load_file
from test_cli import assert_bad_input
from test_generate import assert_greedy_matches_generate
from test_hf_roundtrip import raw_tensors
from test_merge import make_family
from test_mergekit_parity import run_both

import dem_jax
from dem_jax.merge.from_config import merge_from_config
from dem_jax.model.moe import route
from dem_jax.sharding.rules import make_mesh

MOE = ["mixtral", "qwen3_moe"]


def mixtral_experts(tensors: dict) -> dict:
    """mergekit 0.1.5's Mixtral output (fused experts) under the per-expert names."""
    return per_expert_tensors(tensors, mixtral=True)


TOL = 1e-4


def test_route_by_hand():
    logits = np.array([[2.0, 0.0, 1.0, -1.0]], np.float32)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    kept = np.array([p[0], 0.0, p[2], 0.0])
    np.testing.assert_allclose(route(logits, 2, False)[0], kept, rtol=1e-6)
    np.testing.assert_allclose(route(logits, 2, True)[0], kept / kept.sum(), rtol=1e-6)
    # ties go to the lower index, as torch.topk
    np.testing.assert_allclose(route(np.zeros((1, 3), np.float32), 1, True)[0], [1.0, 0, 0])


@pytest.mark.parametrize(
    "case, overrides, changed",
    [
        ("mixtral", {"num_experts_per_tok": 5}, "experts_per_token"),
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ],
)
def test_routing_switches_match_transformers_and_matter(case, overrides, changed, tmp_path):
    hf = save_hf_model(case, tmp_path / "a", tokenizer=False, **overrides)
    model = dem_jax.load_model(tmp_path / "a")
    tokens = random_tokens(2, 11)
    ours = np.asarray(dem_jax.forward(model, tokens))
    np.testing.assert_allclose(ours, torch_logits(hf, tokens), atol=TOL, rtol=0)
    default = dem_jax.ModelConfig(**{**model.config.__dict__})
    default = default.replace(
        **({"experts_per_token": 2} if changed == "experts_per_token" else {"norm_topk_prob": True})
    )
    model.config = default
    assert np.abs(np.asarray(dem_jax.forward(model, tokens)) - ours).max() > 1e-3


@pytest.mark.parametrize("case", MOE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(case, dtype, tmp_path):
    src, mid, back = tmp_path / "src", tmp_path / "orbax", tmp_path / "back"
    save_hf_model(case, src, dtype=dtype)
    dem_jax.save_model(dem_jax.load_model(src), mid, format="orbax")
    dem_jax.save_model(dem_jax.load_model(mid), back, format="hf")
    assert raw_tensors(src) == raw_tensors(back)
    src_config = json.loads((src / "config.json").read_text())
    back_config = json.loads((back / "config.json").read_text())
    # every source field kept (the export adds the 4.x rope keys, and token ids the
    # config left null come from the tokenizer)
    kept = {k: v for k, v in src_config.items() if not (v is None and k.endswith("token_id"))}
    assert {k: back_config[k] for k in kept} == kept


@pytest.mark.parametrize("case", MOE)
def test_padded_batch_and_greedy_match_transformers(case, tmp_path):
    hf = save_hf_model(case, tmp_path, tokenizer=False)
    model = dem_jax.load_model(tmp_path)
    tokens = random_tokens(3, 11, seed=1)
    mask = (np.arange(11)[None] >= 11 - np.array([11, 7, 4])[:, None]).astype(np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ours = np.asarray(dem_jax.forward(model, tokens, attention_mask=mask, positions=positions))
    ref = torch_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=TOL, rtol=0)
    assert_greedy_matches_generate(model, hf)


def test_experts_sharded_over_the_expert_axis(tmp_path):
    hf = save_hf_model("mixtral", tmp_path, tokenizer=False, num_local_experts=4)
    mesh = make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    model = dem_jax.load_model(tmp_path, mesh=mesh)
    mlp = model.params["layers"]["mlp"]
    assert tuple(mlp["gate_proj"].sharding.spec)[:2] == (None, "expert")
    assert "expert" not in tuple(mlp["router"].sharding.spec)
    tokens = random_tokens(4, 11)
    ours = np.asarray(dem_jax.forward(model, tokens, mesh=mesh))
    np.testing.assert_allclose(ours, torch_logits(hf, tokens), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def mixtral_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("moe"), n=2, case="mixtral")


@pytest.mark.parametrize(
    "cfg",
    [
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.7}},
        {"merge_method": "ties", "parameters": {"density": 1.0, "normalize": True}},
    ],
    ids=lambda c: c["merge_method"],
)
def test_merges_equal_mergekit(mixtral_family, cfg, tmp_path):
    """Elementwise merges: the same tensors as mergekit (which merges the fused expert
    tensors whole; elementwise that is the same as expert by expert)."""
    weights = [0.6, 0.3]
    models = [
        {"model": str(p), "parameters": {"weight": w}}
        for p, w in zip(mixtral_family[1:], weights, strict=True)
    ]
    cfg = {**cfg, "models": models, "dtype": "float32"}
    ours, theirs = run_both(mixtral_family, tmp_path, cfg, mixtral_experts)
    assert "model.layers.2.block_sparse_moe.experts.4.w2.weight" in ours
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, rtol=0, err_msg=name)


def _base_and_ft(family):
    return load_file(family[0] / "model.safetensors"), load_file(family[1] / "model.safetensors")


def test_ties_sparsifies_each_expert_on_its_own(mixtral_family, tmp_path):
    """TIES keeps the top ``density`` of each expert's delta (mergekit's ``magnitude``
    per expert tensor), not of all the layer's experts together."""
    from mergekit.sparsify import magnitude

    cfg = {
        "merge_method": "ties",
        "base_model": str(mixtral_family[0]),
        "models": [{"model": str(mixtral_family[1]), "parameters": {"weight": 1.0}}],
        "parameters": {"density": 0.3},
        "dtype": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    base, ft = _base_and_ft(mixtral_family)
    experts = [n for n in ours if ".experts." in n]
    assert len(experts) == 3 * 5 * 3
    for name in experts:
        delta = torch.from_numpy(ft[name] - base[name])
        ref = base[name] + magnitude(delta, 0.3).numpy()
        np.testing.assert_allclose(ours[name], ref, atol=1e-6, rtol=0, err_msg=name)
        assert np.count_nonzero(ours[name] != base[name]) == int(0.3 * delta.numel())


def test_slerp_interpolates_each_expert_on_its_own(mixtral_family, tmp_path):
    from mergekit.merge_methods.slerp import slerp

    cfg = {
        "merge_method": "slerp",
        "base_model": str(mixtral_family[0]),
        "models": [{"model": str(mixtral_family[1])}],
        "parameters": {"t": 0.4},
        "dtype": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    base, ft = _base_and_ft(mixtral_family)
    for name in [n for n in ours if ".experts." in n or ".gate." in n]:
        # mergekit's kernel takes a batch of tensors on a leading axis: a batch of one
        v0, v1 = (torch.from_numpy(x[name])[None] for x in (base, ft))
        ref = slerp(torch.tensor(0.4), v0, v1)[0].numpy()
        np.testing.assert_allclose(ours[name], ref, atol=1e-6, rtol=0, err_msg=name)


def test_merge_refuses_different_expert_counts(mixtral_family, tmp_path, capsys):
    other = tmp_path / "four"
    save_hf_model("mixtral", other, num_local_experts=4)
    merge = tmp_path / "merge.yaml"
    merge.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(mixtral_family[0]),
                "models": [{"model": str(other), "parameters": {"weight": 1.0}}],
            }
        )
    )
    assert_bad_input(capsys, "experts", "merge", merge, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
