"""``dem-jax merge MERGE.yaml``: mergekit's YAML format end to end, and every bad input
ending in exit status 2 with one line naming the file, field or tensor."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from test_merge import leaves, make_family

import dem_jax
from dem_jax.commands import merge as merge_cmd
from dem_jax.errors import DemError
from dem_jax.merge import from_config as M
from dem_jax.merge.request import load_merge_config


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("yfamily"), n=2)


def run(capsys, *argv):
    """Like dem_jax.cli.main, with only the merge command registered."""
    parser = argparse.ArgumentParser(prog="dem-jax")
    merge_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    try:
        code = args.func(args)
    except DemError as e:
        print(f"dem-jax: error: {e}", file=sys.stderr)
        code = 2
    return code, capsys.readouterr().err


def write(tmp_path, cfg, name="merge.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    return path


def ties_config(family, **changes):
    # relative paths: resolved against the YAML's folder (family[0].parent)
    cfg = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "ft1", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "ft2", "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    cfg.update(changes)
    return cfg


def test_merge_command_writes_hf_and_orbax(capsys, family, tmp_path):
    cfg = write(family[0].parent, ties_config(family, out_dtype="bfloat16"), "ties.yaml")
    code, err = run(capsys, "merge", cfg, "--out", tmp_path / "hf")
    assert code == 0, err
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert str(tensors["lm_head.weight"].dtype) == "bfloat16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    code, err = run(
        capsys, "merge", cfg, "--out", tmp_path / "orbax", "--format", "orbax", "--in-memory"
    )
    assert code == 0, err
    a, b = (leaves(dem_jax.load_model(tmp_path / d)) for d in ("hf", "orbax"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # an existing output is left alone
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    code, err = run(capsys, "merge", cfg, "--out", tmp_path / "hf")
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before


def test_one_full_slice_equals_models(family, tmp_path):
    models = ties_config(family, out_dtype="bfloat16")  # as compiled by the test above
    slices = {k: v for k, v in models.items() if k != "models"}
    slices["slices"] = [
        {
            "sources": [
                {"model": m["model"], "layer_range": [0, 3], "parameters": m["parameters"]}
                for m in models["models"]
            ]
        }
    ]
    folder = family[0].parent
    a = M.merge_from_config(write(folder, models, "m.yaml"), tmp_path / "a")
    b = M.merge_from_config(write(folder, slices, "s.yaml"), tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert a != b


def test_parsing_precedence_and_paths(family):
    cfg = {
        "merge_method": "linear",
        "base_model": str(family[0]),
        "models": [{"model": "ft1", "parameters": {"weight": 2.0}}, {"model": "ft2"}],
        "parameters": {"weight": 1.0, "normalize": False},
        "tokenizer_source": "base",
        "random_seed": 7,
    }
    req = load_merge_config(write(family[0].parent, cfg, "lin.yaml"))
    # linear averages the base too: mergekit adds it as an input when not listed
    assert req.models == [family[1], family[2], family[0]]
    assert req.model_parameters == [{"weight": 2.0}, {}, {}]
    assert req.parameters == [{"weight": 1.0, "normalize": False}]
    assert (req.tokenizer_source, req.seed) == (family[0], 7)


BAD = [
    ({"merge_method": "tie"}, "merge_method: unknown merge method 'tie'"),
    ({"models": [{"model": "nope"}]}, "models[0].model: model path 'nope' does not exist"),
    ({"base_model": "ft1/../missing"}, "base_model: model path"),
    ({"parameters": {"density": 1.5}}, "parameters.density: density must be in [0.0, 1.0]"),
    ({"parameters": {"weight": "heavy"}}, "parameters.weight: weight must be a number"),
    ({"parameters": {"normalize": 1}}, "parameters.normalize: normalize must be true or false"),
    ({"parameters": {"gamma": 0.1}}, "merge_method ties takes no parameter 'gamma'"),
    ({"parameters": {"density": [{"filter": 3, "value": 0.5}]}}, "density[0].filter: must be a"),
    ({"parameters": {"density": [0.5, {"value": 0.5}]}}, "a list must hold only numbers"),
    (
        {"models": [{"model": "ft1", "parameters": {"normalize": False, "weight": 1}}]},
        "models[0].parameters.normalize: normalize is one value for the whole merge",
    ),
    ({"models": [{"model": "ft1"}]}, "missing parameter weight for tensor model.embed_tokens"),
    (
        {
            "merge_method": "della",
            "models": [
                {"model": "ft1", "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}
            ],
        },
        "density ± epsilon must lie in (0, 1)",
    ),
    (
        {"merge_method": "slerp", "models": [{"model": "ft1"}], "parameters": {"t": 1.5}},
        "t must be in [0.0, 1.0]",
    ),
    (
        {
            "merge_method": "slerp",
            "models": [{"model": "ft1"}, {"model": "ft2"}],
            "parameters": {"t": 0.5},
        },
        "slerp needs 1 model(s) besides",
    ),
    (
        {"merge_method": "model_stock", "models": [{"model": "ft1"}], "parameters": {}},
        "needs at least 2 model",
    ),
    ({"modules": {"default": {"models": []}}}, "give exactly one of 'models', 'slices' or"),
    ({"tokenizer": {"source": 3}}, "tokenizer.source: expected 'union', 'base' or a model"),
    ({"chat_template": "chat-ml"}, "chat_template: 'chat-ml' is neither 'auto'"),
    ({"out_dtype": "float64"}, "out_dtype: 'float64' is not one of"),
    ({"lora": 1}, "unknown key 'lora'"),
    ({"random_seed": -1}, "random_seed: expected a non-negative integer"),
    (
        {"slices": [{"sources": [{"model": "ft1", "layer_range": [0, 3]}]}] * 2},
        "give exactly one of 'models', 'slices' or 'modules'",
    ),
]


@pytest.mark.parametrize("change, needle", BAD, ids=[n[:30] for _, n in BAD])
def test_bad_config_exits_2_with_one_line(capsys, family, tmp_path, change, needle):
    cfg = ties_config(family, **change)
    path = write(family[0].parent, cfg, f"bad{abs(hash(needle))}.yaml")
    code, err = run(capsys, "merge", path, "--out", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and str(path) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_models(capsys, family, tmp_path):
    # bad slices (layer ranges, lengths, bases): tests/test_merge_slices.py
    folder = family[0].parent
    wide = make_family(tmp_path / "w", n=0, hidden_size=48)[0]
    qwen = make_family(tmp_path / "q", n=0, case="qwen2_bias")[0]
    cases = [
        (
            ties_config(family, models=[{"model": str(wide), "parameters": {"weight": 1}}]),
            "parameter model.embed_tokens.weight (embed.embedding) has shape [101, 48]",
        ),
        (
            ties_config(family, models=[{"model": str(qwen), "parameters": {"weight": 1}}]),
            "architecture 'qwen2' does not match",
        ),
        ("merge_method: [ties", "invalid YAML"),
    ]
    for cfg, needle in cases:
        path = write(folder, cfg, "bad_more.yaml")
        code, err = run(capsys, "merge", path, "--out", tmp_path / "out")
        assert code == 2 and err.count("dem-jax: error:") == 1, err
        assert needle in err, err
    assert not (tmp_path / "out").exists()
    code, err = run(capsys, "merge", folder / "missing.yaml", "--out", tmp_path / "out")
    assert code == 2 and "config file not found" in err
