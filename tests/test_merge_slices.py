"""mergekit's ``slices:``: layer stacking (frankenmerges) and merges over output slices,
against the real mergekit 0.1.5 run on the same YAML, by hand, and in transformers.

Each layout makes the semantics visible: the first slice and the last come from
different models (so the embeddings and the final norm say which slice they follow),
sources take other layers than they land on (so filters tell input from output names),
and gradients run over each slice's own layers.
"""

from __future__ import annotations

import json

# mergekit is a test extra: the reference these tests exist for, so no skip if missing.
import mergekit  # noqa: F401
import numpy as np
import pytest
import transformers
import yaml
from hf_models import random_tokens, save_hf_model, torch_logits
from safetensors.numpy import load_file
from test_merge import make_family
from test_merge_yaml import run as run_cli
from test_moe import mixtral_experts

import dem_jax
from dem_jax.merge.from_config import merge_from_config

TOL = 1e-6  # float32 in both, sums in another order (see test_mergekit_parity.py)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("sfamily"), n=2)  # base, ft1, ft2; 3 layers


def src(path, start, end, **parameters):
    out = {"model": str(path), "layer_range": [start, end]}
    return {**out, "parameters": parameters} if parameters else out


def run_both(tmp_path, cfg, convert=lambda t: t, **ours):
    """``cfg`` through mergekit and dem-jax: (ours, theirs) tensors, (ours, theirs) config."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = {"dtype": "float32", **cfg}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(tmp_path / "mk"),
        MergeOptions(quiet=True, copy_tokenizer=False),
    )
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "ours", **ours)
    tensors = (
        load_file(tmp_path / "ours" / "model.safetensors"),
        convert(load_file(tmp_path / "mk" / "model.safetensors")),
    )
    configs = tuple(json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "mk"))
    return tensors, configs


def assert_same(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    worst = {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours}
    assert max(worst.values()) <= TOL, {k: v for k, v in worst.items() if v > TOL}


def test_frankenmerge_as_mergekit_and_by_hand(family, tmp_path):
    # ft1's layers 0-1, then ft2's layers 1-2: four layers from three. ft2's scale filter
    # names its own layer 1 (output layer 2), as mergekit reads per-model filters.
    scale = [{"filter": "layers.1.", "value": 2.0}, {"value": 1.0}]
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(family[1], 0, 2)]},
            {"sources": [src(family[2], 1, 3, scale=scale)]},
        ],
    }
    (ours, theirs), (hf, mk_hf) = run_both(tmp_path, cfg)
    assert_same(ours, theirs)
    assert hf["num_hidden_layers"] == mk_hf["num_hidden_layers"] == 4
    a, b = (load_file(p / "model.safetensors") for p in family[1:])
    q = "self_attn.q_proj.weight"
    np.testing.assert_array_equal(ours[f"model.layers.1.{q}"], a[f"model.layers.1.{q}"])
    np.testing.assert_array_equal(ours[f"model.layers.2.{q}"], 2 * b[f"model.layers.1.{q}"])
    np.testing.assert_array_equal(ours[f"model.layers.3.{q}"], b[f"model.layers.2.{q}"])
    # the embeddings follow the first slice, the final norm and lm_head the last
    for name, want in [("model.embed_tokens.weight", a), ("model.norm.weight", b)]:
        np.testing.assert_array_equal(ours[name], want[name], err_msg=name)
    np.testing.assert_array_equal(ours["lm_head.weight"], b["lm_head.weight"])

    # (the host executor above.) The JAX engine in memory (every input loaded, then
    # sliced), and from a dem-jax (Orbax) copy of ft2, as streamed from Hugging Face
    # files (only the slice's layers read)
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "mem", streaming=False, engine="jax")
    dem_jax.save_model(dem_jax.load_model(family[2]), tmp_path / "ft2", format="orbax")
    cfg["slices"][1]["sources"][0]["model"] = str(tmp_path / "ft2")
    (tmp_path / "orbax.yaml").write_text(yaml.safe_dump({"dtype": "float32", **cfg}))
    merge_from_config(tmp_path / "orbax.yaml", tmp_path / "from_orbax")
    for other in ("mem", "from_orbax"):
        again = load_file(tmp_path / other / "model.safetensors")
        assert all(np.array_equal(again[k], ours[k]) for k in ours), other

    # the output is a 4-layer model to transformers, and dem-jax agrees with it
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert model.config.num_hidden_layers == 4
    tokens = random_tokens(2, 11)
    logits = np.asarray(dem_jax.forward(dem_jax.load_model(tmp_path / "ours"), tokens))
    np.testing.assert_allclose(logits, torch_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ["host", "jax"])
def test_slerp_gradients_run_within_each_slice(family, tmp_path, engine):
    # t interpolates over each slice's two layers; the slice's own t matches its filter
    # against output names (layers.3 is the second slice's second layer, which no input
    # layer is called).
    base, ft1, ft2 = family
    cfg = {
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": [{"filter": "mlp", "value": [0.0, 0.5, 1.0]}, {"value": [0.2, 0.9]}]},
        "slices": [
            {"sources": [src(base, 0, 2), src(ft1, 1, 3)]},
            {
                "sources": [src(ft2, 0, 2), src(base, 1, 3)],
                "parameters": {
                    "t": [
                        {"filter": "layers.3.", "value": 0.7},
                        {"filter": "self_attn", "value": [1.0, 0.0]},
                    ]
                },
            },
        ],
    }
    (ours, theirs), (hf, mk_hf) = run_both(tmp_path, cfg, engine=engine)
    assert_same(ours, theirs)
    assert hf["num_hidden_layers"] == mk_hf["num_hidden_layers"] == 4
    # mlp: t = 0 at a slice's first layer (the base's layer 0), 1 at its last (ft1's layer 2)
    zero, one = (load_file(p / "model.safetensors") for p in (base, ft1))
    up = "mlp.up_proj.weight"
    for out, want in [
        (f"model.layers.0.{up}", zero[f"model.layers.0.{up}"]),
        (f"model.layers.1.{up}", one[f"model.layers.2.{up}"]),
    ]:
        np.testing.assert_allclose(ours[out], want, atol=TOL, rtol=0, err_msg=out)


@pytest.mark.parametrize("engine", ["host", "jax"])
def test_ties_slices_with_a_base(family, tmp_path, engine):
    # Each slice lists the base with its own layers. ft1's weight filter names its input
    # layer 2, which lands on output layer 1 (slice 0) and output layer 3 (slice 1) ...
    # as mergekit reads it: by the input tensor's name, the slice's t for the gradient.
    base, ft1, ft2 = family
    w1 = [{"filter": "layers.2.", "value": 0.3}, {"value": [0.2, 1.0]}]
    p1, p2 = {"weight": w1, "density": 0.5}, {"weight": 0.5, "density": [0.2, 0.9]}
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": [{"filter": "layers.1.", "value": False}, {"value": True}]},
        "slices": [
            {"sources": [src(base, 0, 2), src(ft1, 1, 3, **p1), src(ft2, 0, 2, **p2)]},
            {"sources": [src(base, 1, 3), src(ft1, 1, 3, **p1), src(ft2, 1, 3, **p2)]},
        ],
    }
    (ours, theirs), (hf, mk_hf) = run_both(tmp_path, cfg, engine=engine)
    assert_same(ours, theirs)
    assert hf["num_hidden_layers"] == mk_hf["num_hidden_layers"] == 4


@pytest.mark.parametrize("engine", ["host", "jax"])
def test_mixtral_frankenmerge_keeps_each_layers_experts(tmp_path, engine):
    a, b = make_family(tmp_path / "moe", n=1, case="mixtral")
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(a, 0, 2)]}, {"sources": [src(b, 1, 3)]}],
    }
    (ours, theirs), (hf, mk_hf) = run_both(tmp_path, cfg, mixtral_experts, engine=engine)
    assert_same(ours, theirs)
    assert hf["num_hidden_layers"] == mk_hf["num_hidden_layers"] == 4
    expert = "block_sparse_moe.experts.{j}.w2.weight"
    want = load_file(b / "model.safetensors")
    for j in range(5):
        got = ours[f"model.layers.3.{expert.format(j=j)}"]
        np.testing.assert_array_equal(got, want[f"model.layers.2.{expert.format(j=j)}"])


@pytest.mark.parametrize(
    "case, kinds",
    [
        # layers: a's 0-1 then b's 1-2; F = full attention, S = sliding window
        ("qwen2_tied_window", "FSSS"),  # sliding from layer max_window_layers = 1 on
        ("gemma3", "SFFS"),  # layer_types S F S, with a RoPE base of its own for S
    ],
)
def test_each_layer_keeps_its_attention_in_transformers(case, kinds, tmp_path):
    # mergekit 0.1.5 cannot save these (transformers refuses a layer_types list of the
    # old length), so the reference is transformers itself reading our config.json.
    a = save_hf_model(case, tmp_path / "a", seed=0)
    save_hf_model(case, tmp_path / "b", seed=1)
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src("a", 0, 2)]}, {"sources": [src("b", 1, 3)]}],
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    names = {"F": "full_attention", "S": "sliding_attention"}
    assert model.config.layer_types == [names[k] for k in kinds]
    assert model.config.sliding_window == a.config.sliding_window
    tokens = random_tokens(2, 11)  # longer than the window: the kinds change the logits
    logits = np.asarray(dem_jax.forward(dem_jax.load_model(tmp_path / "out"), tokens))
    np.testing.assert_allclose(logits, torch_logits(model, tokens), atol=1e-4, rtol=0)


def _bad_cases(family, other_window):
    base, ft1, ft2 = family
    ties = {"merge_method": "ties", "base_model": str(base), "dtype": "float32"}
    pt = {"merge_method": "passthrough"}
    w = {"weight": 1.0}
    return [
        (
            {**pt, "slices": [{"sources": [src(ft1, 1, 4)]}]},
            "slices[0].sources[0].layer_range: [1, 4] lies outside",
        ),
        (
            {**pt, "slices": [{"sources": [src(ft1, 2, 2)]}]},
            "slices[0].sources[0]: layer_range: expected [start, end] with 0 <= start < end",
        ),
        (
            {**ties, "slices": [{"sources": [src(base, 0, 2), src(ft1, 0, 3, **w)]}]},
            "slices[0].sources[1].layer_range: [0, 3] holds 3 layers",
        ),
        (
            {**pt, "slices": [{"sources": [{"model": str(ft1), "layer_rnage": [0, 2]}]}]},
            "slices[0].sources[0]: unknown key 'layer_rnage'",
        ),
        (
            {**pt, "slices": [{"sources": [src(ft1, 0, 2)], "weight": 1}]},
            "slices[0]: unknown key 'weight'",
        ),
        (
            {**pt, "slices": [{"sources": [src(ft1, 0, 2), src(ft2, 0, 2)]}]},
            "slices[0]: merge_method passthrough needs 1 model(s)",
        ),
        (
            {**ties, "slices": [{"sources": [src(ft1, 0, 2, **w), src(ft1, 1, 3, **w)]}]},
            "slices[0].sources[1].model: '" + str(ft1) + "' is listed twice in slices[0]",
        ),
        (
            {**ties, "slices": [{"sources": [src(ft1, 0, 2, **w), src(ft2, 1, 3, **w)]}]},
            "slices[0]: base model",
        ),
        (
            {**ties, "slices": [{"sources": [src(base, 0, 2), src(ft1, 0, 2, density=2)]}]},
            "slices[0].sources[1].parameters.density: density must be in",
        ),
        (
            {
                **pt,
                "slices": [{"sources": [src(ft1, 0, 2)]}, {"sources": [src(other_window, 0, 1)]}],
            },
            "architecture 'qwen2' does not match",
        ),
    ]


def test_bad_slices_exit_2_with_one_line(capsys, family, tmp_path):
    qwen = tmp_path / "qwen"
    save_hf_model("qwen2_tied_window", qwen)
    for i, (cfg, needle) in enumerate(_bad_cases(family, qwen)):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, err = run_cli(capsys, "merge", path, "--out", tmp_path / "out")
        lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert needle in lines[0] and str(path) in lines[0], (needle, lines[0])
        assert not (tmp_path / "out").exists()


def test_windows_of_two_sizes_are_refused(capsys, tmp_path):
    save_hf_model("qwen2_tied_window", tmp_path / "a", tokenizer=False)
    save_hf_model("qwen2_tied_window", tmp_path / "b", tokenizer=False, sliding_window=3)
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src("a", 0, 2)]}, {"sources": [src("b", 1, 3)]}],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(capsys, "merge", path, "--out", tmp_path / "out")
    assert code == 2 and err.count("dem-jax: error:") == 1, err
    assert "sliding windows of different sizes (3, 4)" in err
    assert not (tmp_path / "out").exists()
