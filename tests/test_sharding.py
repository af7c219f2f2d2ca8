"""Models on a simulated (2, 4) device mesh (8 CPU devices, see conftest)."""

import jax
import numpy as np
import pytest
from hf_models import random_tokens, save_hf_model
from jax.sharding import PartitionSpec as P

import dem_jax
from dem_jax.errors import DemError
from dem_jax.sharding.rules import logical_to_spec, make_mesh


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest must set up 8 host devices"
    return make_mesh(data=1, fsdp=2, tensor=4)


def spec_of(array):
    return array.sharding.spec


def test_mesh_construction():
    shape = {"data": 1, "fsdp": 2, "expert": 1, "tensor": 4}
    assert dict(make_mesh(fsdp=2, tensor=4).shape) == shape
    shape = {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert dict(make_mesh(data=2, tensor=2).shape) == shape
    shape = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert dict(make_mesh(expert=2, tensor=2).shape) == shape
    with pytest.raises(DemError, match="do not fit"):
        make_mesh(data=-1, fsdp=3)
    assert make_mesh(data=1, fsdp=1, tensor=1).devices.size == 1


def test_logical_rules_fall_back_to_replication(mesh):
    # 8 kv heads shard over tensor=4; 1 kv head (MQA) cannot and stays replicated.
    assert logical_to_spec(("embed", "kv_heads"), (40, 8), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "kv_heads"), (40, 1), mesh) == P("fsdp", None)
    # A mesh axis is never used twice in one array.
    assert logical_to_spec(("vocab", "heads"), (8, 8), mesh) == P("tensor", None)


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2_bias", "llama_mqa"])
def test_sharded_model_matches_unsharded(case, mesh, tmp_path):
    save_hf_model(
        case, tmp_path, tokenizer=False, num_key_value_heads=4 if case != "llama_mqa" else 1
    )
    plain = dem_jax.load_model(tmp_path)
    sharded = dem_jax.load_model(tmp_path, mesh=mesh)

    p = sharded.params
    kv = P(None, "fsdp", "tensor", None) if case != "llama_mqa" else P(None, "fsdp", None, None)
    assert spec_of(p["embed"]["embedding"]) == P(None, "fsdp")  # vocab 101: not divisible by 4
    assert spec_of(p["layers"]["attn"]["q_proj"]["kernel"]) == P(None, "fsdp", "tensor", None)
    assert spec_of(p["layers"]["attn"]["k_proj"]["kernel"]) == kv
    assert spec_of(p["layers"]["attn"]["o_proj"]["kernel"]) == P(None, "tensor", None, "fsdp")
    assert spec_of(p["layers"]["mlp"]["gate_proj"]["kernel"]) == P(None, "fsdp", "tensor")
    assert spec_of(p["layers"]["mlp"]["down_proj"]["kernel"]) == P(None, "tensor", "fsdp")
    assert spec_of(p["layers"]["attn_norm"]["scale"]) == P(None, None)
    assert spec_of(p["lm_head"]["kernel"]) == P("fsdp", None)
    # Really split: each device holds a quarter (tensor) of a half (fsdp) of q_proj.
    q = p["layers"]["attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(3, 20, 1, 10)}
    assert len(q.sharding.device_set) == 8
    if case == "qwen2_bias":
        assert spec_of(p["layers"]["attn"]["q_proj"]["bias"]) == P(None, "tensor", None)

    for leaf_plain, leaf_sharded in zip(
        jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(leaf_plain), np.asarray(leaf_sharded))
    tokens = random_tokens(4, 11)
    np.testing.assert_allclose(
        np.asarray(dem_jax.forward(sharded, tokens, mesh=mesh)),
        np.asarray(dem_jax.forward(plain, tokens)),
        atol=1e-5,
    )


def test_orbax_restores_onto_mesh(mesh, tmp_path):
    save_hf_model("llama_gqa", tmp_path / "hf", tokenizer=False, num_key_value_heads=4)
    dem_jax.save_model(dem_jax.load_model(tmp_path / "hf", mesh=mesh), tmp_path / "orbax")
    restored = dem_jax.load_model(tmp_path / "orbax", mesh=mesh)
    q = restored.params["layers"]["attn"]["q_proj"]["kernel"]
    assert spec_of(q) == P(None, "fsdp", "tensor", None)
    plain = dem_jax.load_model(tmp_path / "hf")
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(plain.params["layers"]["attn"]["q_proj"]["kernel"])
    )


def test_init_model_on_mesh(mesh):
    config = dem_jax.ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
    )
    model = dem_jax.init_model(config, seed=0, mesh=mesh)
    assert spec_of(model.params["embed"]["embedding"]) == P("tensor", "fsdp")
    reference = dem_jax.init_model(config, seed=0)
    tokens = np.arange(16).reshape(2, 8)
    np.testing.assert_allclose(
        np.asarray(dem_jax.forward(model, tokens, mesh=mesh)),
        np.asarray(dem_jax.forward(reference, tokens)),
        atol=1e-5,
    )
