"""The merge engine on whole models: identities, meshes, streaming, per-layer parameters.

Models are tiny random transformers checkpoints: a base and fine-tunes that are the
base plus small noise (one tensor left untouched, so some deltas are exactly zero).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_models import build_hf_model, save_tokenizer

import dem_jax
from dem_jax.errors import DemError
from dem_jax.io.hf.weights import tensor_maps
from dem_jax.io.tree import get_leaf
from dem_jax.merge import engine as M
from dem_jax.merge.output import merge_to_directory
from dem_jax.sharding.rules import param_shardings
from dem_jax.vectors.vector import distribution_vector

U32 = 2.0**-24  # float32 unit roundoff


def make_family(root, n=2, case="llama_gqa", scale=0.01, **overrides):
    """Save a base and ``n`` fine-tunes (base + scale * noise) under ``root``; their paths."""
    import torch

    paths = []
    for i in range(n + 1):
        model = build_hf_model(case, seed=0, **overrides)
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if i == 1 and name == "model.norm.weight":
                        continue  # left untouched: an all-zero delta
                    p.add_(scale * torch.randn(p.shape, generator=gen))
        path = root / ("base" if i == 0 else f"ft{i}")
        model.save_pretrained(path)
        save_tokenizer(path)
        paths.append(path)
    return paths


def leaves(model):
    """{HF-ish leaf name: numpy array} of a Model's params."""
    return {
        ".".join(t.path): np.asarray(get_leaf(model.params, t.path))
        for t in tensor_maps(model.config)
    }


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def loaded(family):
    return [dem_jax.load_model(p) for p in family]


def test_zero_weights_give_the_base_bit_for_bit(family, loaded):
    base = loaded[0]
    inputs = [M.MergeInput(p, {"weight": 0.0}) for p in family[1:]]
    merged = M.merge("dem", family[0], inputs)
    for name, a in leaves(merged).items():
        np.testing.assert_array_equal(a, leaves(base)[name], err_msg=name)
    vecs = [distribution_vector(base, m) for m in loaded[1:]]
    merged = M.merge("dem", base, [M.MergeInput(v, {"weight": 0.0}) for v in vecs])
    for name, a in leaves(merged).items():
        np.testing.assert_array_equal(a, leaves(base)[name], err_msg=name)


def test_one_vector_with_weight_one_gives_the_finetuned_model(loaded):
    # fl(fl(a - b) + b) = a + (a - b) d1 + s d2 with |d1|, |d2| <= u = 2^-24, so the
    # error is at most u (|a - b| + |a|) + u^2 |a - b|; it is exactly 0 wherever a and b
    # are within a factor 2 (Sterbenz), i.e. almost everywhere for a fine-tune.
    base, ft = loaded[0], loaded[1]
    vec = distribution_vector(base, ft)
    for inputs in ([M.MergeInput(vec, {"weight": 1.0})], [M.MergeInput(ft, {"weight": 1.0})]):
        merged = M.merge("dem", base, inputs)
        exact = 0
        for name, m in leaves(merged).items():
            a, b = leaves(ft)[name], leaves(base)[name]
            bound = U32 * (np.abs(a - b) + np.abs(a)) * (1 + U32)
            assert np.all(np.abs(m - a) <= bound), name
            exact += np.sum(m == a)
        assert exact / ft.config.num_params > 0.99


def test_linear_of_identical_models_is_that_model(loaded):
    ft = loaded[1]
    inputs = [M.MergeInput(ft, {"weight": w}) for w in (0.2, 0.3, 0.5)]
    merged = M.merge("linear", None, inputs)
    for name, m in leaves(merged).items():
        # (0.2 x + 0.3 x + 0.5 x) / 1.0: three roundings of about u |x| each
        np.testing.assert_allclose(m, leaves(ft)[name], rtol=4 * U32, atol=0, err_msg=name)


# Settings shared with test_streaming_equals_in_memory, so single-device compiles are reused.
DARE = {"weight": 0.7, "density": 0.6}
TIES = {"weight": 0.7, "density": 0.4}
MESH_CASES = {"ties": TIES, "dare_linear": DARE}


@pytest.mark.parametrize("method", list(MESH_CASES))
def test_mesh_equals_single_device(family, method):
    inputs = [M.MergeInput(p, MESH_CASES[method]) for p in family[1:]]
    mesh = dem_jax.make_mesh(fsdp=2, tensor=4)
    one = M.merge(method, family[0], inputs, seed=3)
    many = M.merge(method, family[0], inputs, seed=3, mesh=mesh, streaming=True)
    shardings = param_shardings(many.config, mesh)
    base = leaves(dem_jax.load_model(family[0]))
    for tmap in tensor_maps(one.config):
        name = ".".join(tmap.path)
        x, y = get_leaf(one.params, tmap.path), get_leaf(many.params, tmap.path)
        assert y.sharding.is_equivalent_to(get_leaf(shardings, tmap.path), y.ndim), name
        x, y = np.asarray(x), np.asarray(y)
        # Same random draw: the same elements are kept (equal to the base) on both.
        np.testing.assert_array_equal(x == base[name], y == base[name], err_msg=name)
        if method == "ties":  # elementwise after an exact sort: bit-identical
            np.testing.assert_array_equal(y, x, err_msg=name)
        else:  # the L1 rescale sums in a mesh-dependent order: a few ulps of |x| <= 1.2
            np.testing.assert_allclose(y, x, rtol=0, atol=4e-7, err_msg=name)


def test_streaming_equals_in_memory_from_hf_and_orbax(family, loaded, tmp_path):
    orbax_base = dem_jax.save_model(loaded[0], tmp_path / "base_orbax")
    orbax_ft = dem_jax.save_model(loaded[2], tmp_path / "ft2_orbax")
    for method, settings in (("dare_linear", DARE), ("ties", TIES)):
        hf_inputs = [M.MergeInput(p, settings) for p in family[1:]]
        mixed = [M.MergeInput(family[1], settings), M.MergeInput(orbax_ft, settings)]
        ref = leaves(M.merge(method, family[0], hf_inputs, seed=5))
        for base, inputs in ((family[0], hf_inputs), (orbax_base, mixed)):
            out = leaves(M.merge(method, base, inputs, seed=5, streaming=True))
            for name, a in out.items():
                np.testing.assert_array_equal(a, ref[name], err_msg=f"{method} {name}")


def test_seeded_draw_is_reproducible_and_seed_dependent(family):
    inputs = [M.MergeInput(p, DARE) for p in family[1:]]
    a = leaves(M.merge("dare_linear", family[0], inputs, seed=1))
    b = leaves(M.merge("dare_linear", family[0], inputs, seed=1))
    c = leaves(M.merge("dare_linear", family[0], inputs, seed=2))
    name = "layers.mlp.up_proj.kernel"
    np.testing.assert_array_equal(a[name], b[name])
    assert np.mean(a[name] != c[name]) > 0.2


def test_per_layer_filter_and_gradient(family, loaded):
    # weight: 0 on every MLP tensor; elsewhere a gradient 0 -> 1 over the 3 layers
    # (t = 0, 0.5, 1); embeddings / final norm / lm_head take t = 0.
    setting = [{"filter": "mlp", "value": 0.0}, {"value": [0.0, 1.0]}]
    merged = leaves(M.merge("dem", family[0], [M.MergeInput(family[1], {"weight": setting})]))
    base, ft = leaves(loaded[0]), leaves(loaded[1])
    for name, m in merged.items():
        delta = ft[name].astype(np.float32) - base[name]
        if ".mlp." in name or not name.startswith("layers."):
            want = base[name] + np.float32(0.0) * delta
            np.testing.assert_array_equal(m, want, err_msg=name)
            continue
        for i, t in enumerate((0.0, 0.5, 1.0)):
            want = base[name][i] + np.float32(t) * delta[i]
            np.testing.assert_array_equal(m[i], want, err_msg=f"{name}[{i}]")


def test_pure_merge_tree_under_jit_with_traced_weights(loaded):
    base = loaded[0]
    vecs = [distribution_vector(base, m) for m in loaded[1:]]

    @jax.jit
    def merged(w):
        return M.merge_tree(
            "dem",
            base.config,
            base.params,
            [v.params for v in vecs],
            model_parameters=[{"weight": w[0]}, {"weight": w[1]}],
            is_vector=[True, True],
        )

    for w in ((0.3, 0.9), (1.5, -0.2)):
        inputs = [M.MergeInput(v, {"weight": x}) for v, x in zip(vecs, w, strict=True)]
        want = M.merge("dem", base, inputs)
        got = merged(np.asarray(w, np.float32))
        for tmap in tensor_maps(base.config):
            np.testing.assert_allclose(
                np.asarray(get_leaf(got, tmap.path)),
                np.asarray(get_leaf(want.params, tmap.path)),
                rtol=1e-6,
                atol=1e-7,
            )
    assert merged._cache_size() == 1


def test_new_weights_do_not_recompile(loaded):
    base, ft = loaded[0], loaded[1]
    M.merge("dem", base, [M.MergeInput(ft, {"weight": 0.25})])
    before = M._run_job._cache_size()
    M.merge("dem", base, [M.MergeInput(ft, {"weight": 0.75})])
    assert M._run_job._cache_size() == before


def test_dtype_rounds_inputs_and_out_dtype_casts(family, loaded):
    inputs = [M.MergeInput(family[1], {"weight": 1.0})]
    out = M.merge("dem", family[0], inputs, dtype="bfloat16", out_dtype="float32")
    assert out.config.param_dtype == "float32"
    name = "layers.attn.q_proj.kernel"
    a = leaves(loaded[1])[name].astype(jax.numpy.bfloat16).astype(np.float32)
    b = leaves(loaded[0])[name].astype(jax.numpy.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(leaves(out)[name], b + (a - b))
    out = M.merge("dem", family[0], inputs, out_dtype="bfloat16")
    assert out.config.param_dtype == "bfloat16"
    assert get_leaf(out.params, ("embed", "embedding")).dtype == jax.numpy.bfloat16


def test_hf_and_orbax_outputs_load_back(family, tmp_path):
    inputs = [M.MergeInput(p, TIES) for p in family[1:]]  # compiled by earlier tests
    ref = leaves(M.merge("ties", family[0], inputs))
    for fmt in ("hf", "orbax"):
        out = merge_to_directory(tmp_path / fmt, "ties", family[0], inputs, format=fmt)
        back = dem_jax.load_model(out)
        assert (out / "tokenizer.json").is_file()
        for name, a in leaves(back).items():
            np.testing.assert_array_equal(a, ref[name], err_msg=f"{fmt} {name}")
    with pytest.raises(DemError, match="already exists"):
        merge_to_directory(tmp_path / "hf", "ties", family[0], inputs, format="hf")


def test_library_bad_inputs(family, loaded, tmp_path):
    ft = [M.MergeInput(p, {"weight": 1.0}) for p in family[1:]]
    with pytest.raises(DemError, match="unknown merge method 'tie'"):
        M.merge("tie", family[0], ft)
    with pytest.raises(DemError, match="needs a base model"):
        M.merge("ties", None, ft)
    with pytest.raises(DemError, match="missing parameter weight for tensor"):
        M.merge("dem", family[0], family[1:])
    with pytest.raises(DemError, match="not a vector"):
        vec = distribution_vector(loaded[0], loaded[1])
        M.merge("dem", vec, ft)
    with pytest.raises(DemError, match="needs 1 model"):
        M.merge("slerp", family[0], family[1:], parameters={"t": 0.5})
    wide = make_family(tmp_path, n=0, hidden_size=48)[0]
    with pytest.raises(DemError, match=r"embed_tokens\.weight .*has shape \[101, 48\]"):
        M.merge("dem", family[0], [M.MergeInput(wide, {"weight": 1.0})])


def test_vector_directories_as_inputs(family, loaded, tmp_path):
    from dem_jax.vectors.store import save_vector

    settings = [{"weight": 0.4}, {"weight": 0.9}]
    paths = [
        save_vector(distribution_vector(loaded[0], m), tmp_path / f"v{i}")
        for i, m in enumerate(loaded[1:])
    ]
    ref = leaves(
        M.merge(
            "dem",
            family[0],
            [M.MergeInput(p, s) for p, s in zip(family[1:], settings, strict=True)],
        )
    )
    for streaming in (False, True):
        inputs = [M.MergeInput(p, s) for p, s in zip(paths, settings, strict=True)]
        out = leaves(M.merge("dem", family[0], inputs, streaming=streaming))
        for name, a in out.items():  # Σ w (a - b) either way: same float32 ops
            np.testing.assert_array_equal(a, ref[name], err_msg=name)
