"""Distribution vectors: exact differences, save/load, mesh placement, diagnostics
against plain NumPy, mismatches, and the ``dem-jax vectors`` command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from test_merge import leaves, make_family

import dem_jax
from dem_jax.commands import vectors as vectors_cmd
from dem_jax.errors import DemError
from dem_jax.io.hf.weights import tensor_maps
from dem_jax.io.tree import get_leaf
from dem_jax.vectors.diagnostics import vector_diagnostics
from dem_jax.vectors.store import load_vector, save_vector
from dem_jax.vectors.vector import check_compatible, distribution_vector


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("vfamily"), n=3)


@pytest.fixture(scope="module")
def models(family):
    return [dem_jax.load_model(p) for p in family]


def vec_leaves(vec):
    return {
        ".".join(t.path): np.asarray(get_leaf(vec.params, t.path)) for t in tensor_maps(vec.config)
    }


def test_vector_is_the_float32_difference(models, family):
    base, ft = models[0], models[1]
    vec = distribution_vector(base, ft, name="a", base_path=family[0], model_path=family[1])
    assert vec.config.param_dtype == "float32"
    b, f = leaves(base), leaves(ft)
    for name, v in vec_leaves(vec).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, f[name].astype(np.float32) - b[name], err_msg=name)
    assert not np.any(vec_leaves(vec)["final_norm.scale"])  # ft1 left model.norm untouched


def test_save_load_roundtrip(models, family, tmp_path):
    vec = distribution_vector(models[0], models[2], name="b", base_path=family[0])
    out = save_vector(vec, tmp_path / "b")
    back = load_vector(out)
    assert (back.name, back.base_path, back.model_path) == ("b", str(family[0]), None)
    assert back.config == vec.config
    for name, v in vec_leaves(back).items():
        np.testing.assert_array_equal(v, vec_leaves(vec)[name], err_msg=name)
    with pytest.raises(DemError, match="already exists"):
        save_vector(vec, out)
    with pytest.raises(DemError, match="does not exist"):
        load_vector(tmp_path / "nope")


def test_vector_on_a_mesh_keeps_the_shardings(family, models):
    mesh = dem_jax.make_mesh(fsdp=2, tensor=4)
    base, ft = (dem_jax.load_model(p, mesh=mesh) for p in family[:2])
    vec = distribution_vector(base, ft)
    ref = vec_leaves(distribution_vector(models[0], models[1]))
    for tmap in tensor_maps(vec.config):
        leaf = get_leaf(vec.params, tmap.path)
        assert leaf.sharding == get_leaf(base.params, tmap.path).sharding
        np.testing.assert_array_equal(np.asarray(leaf), ref[".".join(tmap.path)])


def test_diagnostics_match_numpy(models):
    vecs = [distribution_vector(models[0], m) for m in models[1:]]
    names = ["a", "b", "c"]
    diag = vector_diagnostics(vecs, names)
    flat = [
        np.concatenate([v.ravel() for v in vec_leaves(x).values()]).astype(np.float64) for x in vecs
    ]
    for i, name in enumerate(names):
        entry = diag["norms"][name]
        np.testing.assert_allclose(entry["total"], np.linalg.norm(flat[i]), rtol=1e-5)
        per_layer = [
            np.sqrt(
                sum(
                    np.sum(v[layer].astype(np.float64) ** 2)
                    for k, v in vec_leaves(vecs[i]).items()
                    if k.startswith("layers.")
                )
            )
            for layer in range(3)
        ]
        np.testing.assert_allclose(entry["layers"], per_layer, rtol=1e-5)
        q = vec_leaves(vecs[i])["layers.attn.q_proj.kernel"]
        np.testing.assert_allclose(
            entry["groups"]["self_attn.q_proj.weight"], np.linalg.norm(q), rtol=1e-5
        )
    cos = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in flat] for a in flat]
    np.testing.assert_allclose(diag["cosine"], cos, rtol=1e-5, atol=1e-6)
    stack = np.stack(flat)
    compared = np.sum(stack != 0, axis=0) >= 2
    conflict = np.any(stack > 0, axis=0) & np.any(stack < 0, axis=0)
    sc = diag["sign_conflict"]
    assert (sc["compared"], sc["conflicting"]) == (int(compared.sum()), int(conflict.sum()))
    # Three vectors of independent signs disagree with probability 1 - 2/2^3 = 3/4
    # (two of them, where model.norm is untouched in a: 1/2), so slightly below 0.75.
    assert 0.73 < sc["rate"] < 0.75
    one = vector_diagnostics(vecs[:1], ["a"])
    assert one["sign_conflict"]["rate"] is None and one["cosine"] == [[pytest.approx(1.0)]]


def test_mismatches_name_the_model_and_parameter(tmp_path, models):
    qwen = make_family(tmp_path / "q", n=0, case="qwen2_bias")[0]
    deep = make_family(tmp_path / "d", n=0, num_hidden_layers=4)[0]
    with pytest.raises(DemError, match=r"qwen: architecture 'qwen2' does not match base"):
        check_compatible(models[0].config, dem_jax.load_model(qwen).config, "base", "qwen")
    with pytest.raises(
        DemError, match=r"deep: parameter model\.layers\.\*\.self_attn\.q_proj\.weight .* shape"
    ):
        distribution_vector(models[0], dem_jax.load_model(deep), name="deep")


def run(capsys, *argv):
    """Like dem_jax.cli.main, with only the vectors command registered."""
    parser = argparse.ArgumentParser(prog="dem-jax")
    vectors_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    try:
        code = args.func(args)
    except DemError as e:
        print(f"dem-jax: error: {e}", file=__import__("sys").stderr)
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_writes_vectors_and_diagnostics(capsys, family, tmp_path):
    out = tmp_path / "vecs"
    code, stdout, err = run(
        capsys,
        "vectors",
        "--base",
        family[0],
        "--model",
        f"x={family[1]}",
        "--model",
        f"y={family[2]}",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    diag = json.loads(stdout)
    assert diag == json.loads((out / "diagnostics.json").read_text())
    assert diag["names"] == ["x", "y"] and len(diag["norms"]["x"]["layers"]) == 3
    assert load_vector(out / "y").model_path == str(family[2])
    code, stdout, err = run(
        capsys, "vectors", "--base", family[0], "--model", f"x={family[1]}", "--out", out
    )
    assert code == 2 and "already exists" in err
    code, stdout, err = run(
        capsys,
        "vectors",
        "--base",
        family[0],
        "--model",
        f"x={family[1]}",
        "--out",
        out,
        "--overwrite",
    )
    assert code == 0 and "cosine similarity" in stdout


@pytest.mark.parametrize(
    "model, needle",
    [("x", "expected NAME=PATH"), ("x/y=.", "expected NAME=PATH"), ("x=/nope", "does not exist")],
)
def test_command_bad_input(capsys, family, tmp_path, model, needle):
    code, _, err = run(
        capsys, "vectors", "--base", family[0], "--model", model, "--out", tmp_path / "v"
    )
    lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
