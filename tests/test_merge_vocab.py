"""Models with different vocabularies: ``tokenizer_source`` (``union``, ``base``, a
model) and the ``tokenizer:`` section, against mergekit 0.1.5 run on the same YAML.

mergekit numbers the tokens it adds in an order that changes from run to run (it walks
a set of models and hash-ordered vocabularies), so outputs are compared token by token:
for every token of the output vocabulary, its row of the embedding and of lm_head."""

from __future__ import annotations

import json

# mergekit is a test extra: the reference these tests exist for, so no skip if missing.
import mergekit  # noqa: F401
import numpy as np
import pytest
import yaml
from hf_models import VOCAB, build_hf_model, save_tokenizer
from test_merge_options import run_mergekit, tensors

from dem_jax import cli

EXTRA = {1: ["<x1>", "<x2>"], 2: ["<x2>", "<y1>", "<y2>"]}  # tokens each fine-tune adds


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base (the tests' word-level tokenizer) and two fine-tunes, each with tokens of
    its own appended (embedding and lm_head resized, new rows random)."""
    import torch
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vocab")
    paths = []
    for i in range(3):
        model = build_hf_model("llama_gqa", seed=0)
        path = root / ("base" if i == 0 else f"ft{i}")
        save_tokenizer(path)
        tok = AutoTokenizer.from_pretrained(str(path))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * i * torch.randn(p.shape, generator=gen))
            if i:
                tok.add_tokens(EXTRA[i])
                model.resize_token_embeddings(len(tok), mean_resizing=False)
                n = len(EXTRA[i])
                model.get_input_embeddings().weight[-n:] = torch.randn(n, 40, generator=gen)
                model.get_output_embeddings().weight[-n:] = torch.randn(n, 40, generator=gen)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths


def merge_yaml(family, method="ties", **extra):
    models = [{"model": str(p), "parameters": {"weight": 0.6, "density": 0.7}} for p in family[1:]]
    if method == "linear":
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in family]
    cfg = {"merge_method": method, "base_model": str(family[0]), "models": models}
    return {**cfg, "dtype": "float32", **extra}


def by_token(directory) -> dict[str, dict[str, np.ndarray]]:
    """{tensor: {token: row}} of an output's vocabulary tensors."""
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    added = json.loads((directory / "tokenizer.json").read_text())["added_tokens"]
    vocab = {**vocab, **{a["content"]: a["id"] for a in added}}
    t = tensors(directory)
    return {
        name: {tok: t[name][i] for tok, i in vocab.items()}
        for name in ("model.embed_tokens.weight", "lm_head.weight")
    }


def run_both(family, tmp_path, cfg, capsys=None):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert cli.main(["merge", str(path), "--out", str(ours), "--quiet"]) == 0
    run_mergekit(cfg, theirs)
    return ours, theirs


def assert_same_by_token(ours, theirs, atol=1e-6):
    a, b = by_token(ours), by_token(theirs)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name  # the same tokens
        for tok, row in a[name].items():
            np.testing.assert_allclose(row, b[name][tok], atol=atol, err_msg=f"{name} {tok}")
    ta, tb = tensors(ours), tensors(theirs)
    for name in ta:  # every other tensor as mergekit merges it
        if name not in a:
            np.testing.assert_allclose(ta[name], tb[name], atol=atol, err_msg=name)
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    assert ca["vocab_size"] == cb["vocab_size"]


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_union_equals_mergekit(family, tmp_path, method):
    ours, theirs = run_both(family, tmp_path, merge_yaml(family, method, tokenizer_source="union"))
    assert_same_by_token(ours, theirs)
    vocab = by_token(ours)["model.embed_tokens.weight"]
    assert {"<x1>", "<x2>", "<y1>", "<y2>"} <= set(vocab)
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == len(vocab) == VOCAB + 4


@pytest.mark.parametrize("source", ["base", "ft2"])
def test_a_named_tokenizer_source_reindexes_like_mergekit(family, tmp_path, source):
    src = "base" if source == "base" else str(family[2])
    ours, theirs = run_both(family, tmp_path, merge_yaml(family, tokenizer_source=src))
    assert_same_by_token(ours, theirs)


def test_tokenizer_section_token_sources_force_and_padding(family, tmp_path):
    section = {
        "source": "union",
        "pad_to_multiple_of": 32,
        "tokens": {
            "<x1>": {"source": str(family[1]), "force": True},
            "<y1>": {"source": {"kind": "zero"}},
            "<y2>": {"source": {"kind": "model_token", "model": str(family[0]), "token": "w5"}},
            "w7": {
                "source": {"kind": "model_token", "model": str(family[2]), "token_id": 9},
                "force": True,
            },
        },
    }
    # task arithmetic: no top-k, whose ties among the equal padding rows would break
    # differently in torch
    cfg = merge_yaml(family, "task_arithmetic", tokenizer=section)
    ours, theirs = run_both(family, tmp_path, cfg)
    assert_same_by_token(ours, theirs)
    t = tensors(ours)
    rows = -(-(VOCAB + 4) // 32) * 32  # the union's tokens, padded to a multiple of 32
    assert t["model.embed_tokens.weight"].shape[0] == rows
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == rows
    theirs_t = tensors(theirs)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # padding: the mean row
        np.testing.assert_allclose(t[name][VOCAB + 4 :], theirs_t[name][VOCAB + 4 :], atol=1e-6)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "not both"),
        ({"tokenizer": {"tokens": {"<x1>": {"source": "nowhere"}}}}, "does not exist"),
        ({"tokenizer": {"tokens": {"<x1>": {"force": "yes"}}}}, "true or false"),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
        ({"tokenizer": {"sauce": 1}}, "unknown key 'sauce'"),
    ],
)
def test_bad_tokenizer_settings_exit_2(family, tmp_path, capsys, extra, needle):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(merge_yaml(family, **extra)))
    code = cli.main(["merge", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o").exists()


def test_the_jax_engine_refuses_different_vocabularies(family, tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(merge_yaml(family, tokenizer_source="union")))
    code = cli.main(["merge", str(path), "--out", str(tmp_path / "o"), "--engine", "jax"])
    err = capsys.readouterr().err
    assert code == 2 and "host executor" in err, err


def test_without_a_tokenizer_source_different_vocabularies_are_refused(family, tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(merge_yaml(family)))
    code = cli.main(["merge", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "dem-jax: error:" in err, err


def _src(path, start, end, **parameters):
    return {"model": str(path), "layer_range": [start, end], "parameters": parameters}


@pytest.mark.parametrize("kind", ["ties_slices", "frankenmerge"])
def test_union_with_slices_equals_mergekit(family, tmp_path, kind):
    # The embeddings come from the first slice's sources, lm_head from the last's, each
    # re-indexed to the union's tokens as in a models: merge (host executor).
    base, ft1, ft2 = family
    p = {"weight": 0.6, "density": 0.7}
    if kind == "ties_slices":
        cfg = {
            "merge_method": "ties",
            "base_model": str(base),
            "slices": [
                {"sources": [_src(base, 0, 2), _src(ft1, 0, 2, **p), _src(ft2, 1, 3, **p)]},
                {"sources": [_src(base, 2, 3), _src(ft1, 2, 3, **p), _src(ft2, 0, 1, **p)]},
            ],
        }
    else:
        cfg = {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(ft1), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(ft2), "layer_range": [1, 3]}]},
            ],
        }
    cfg = {**cfg, "dtype": "float32", "tokenizer_source": "union"}
    ours, theirs = run_both(family, tmp_path, cfg)
    assert_same_by_token(ours, theirs)
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == VOCAB + 4
