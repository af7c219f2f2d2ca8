"""Parity with mergekit 0.1.5 for the methods beyond the task-vector family: nuslerp,
multislerp, karcher, sce, nearswap, arcee_fusion, passthrough, ram, ramplus_tl.

Whole merges: the same MERGE.yaml through mergekit and through dem-jax on tiny
random Hugging Face models (as ``test_mergekit_parity``), every tensor compared.
Edge cases (colinear, degenerate and zero inputs): mergekit's own method objects on
small tensors against the dem-jax kernels. Bad settings: one-line DemErrors.

The fine-tunes here differ from the base by 0.3 · N(0, 1) (not 0.01): arcee_fusion's
KL importance is then large enough that float32 rounding (torch's vs XLA's
reduction order) does not move elements across its threshold.
"""

from __future__ import annotations

import mergekit.merge_methods as mk
import numpy as np
import pytest
import torch
import yaml
from mergekit.merge_methods.base import TensorGroup
from safetensors.numpy import load_file
from test_merge import make_family
from test_mergekit_parity import run_both

from dem_jax.errors import DemError
from dem_jax.merge.from_config import merge_from_config
from dem_jax.merge.methods import karcher, multislerp, nuslerp, sce
from dem_jax.merge.registry import METHODS

TOL = 1e-6  # absolute and relative: both sides compute in float32, in different orders


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("mfamily"), n=3, scale=0.3)


@pytest.fixture(scope="module")
def tensors(family):
    return [load_file(p / "model.safetensors") for p in family]


def test_every_mergekit_method_is_here():
    theirs = {m.spec.name for m in mk.registered_methods()}
    assert len(theirs) >= 20
    assert theirs <= set(METHODS), sorted(theirs - set(METHODS))
    assert all(METHODS[name].in_mergekit for name in theirs)


def entries(family, *settings):
    """``models:`` entries for the fine-tunes, with the given parameters."""
    return [{"model": str(p), "parameters": s} for p, s in zip(family[1:], settings, strict=False)]


GRADIENT = [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.5}]
NOBASE = {"base_model": None}
CASES = {
    "nuslerp": (
        {
            "merge_method": "nuslerp",
            "parameters": {
                "nuslerp_flatten": False,
                "nuslerp_row_wise": [{"filter": "mlp", "value": True}, {"value": False}],
            },
        },
        [{"weight": GRADIENT}, {"weight": 0.7}],
    ),
    "nuslerp_no_base": ({"merge_method": "nuslerp", **NOBASE}, [{"weight": 0.3}, {"weight": 0.6}]),
    "multislerp": (
        {"merge_method": "multislerp"},
        [{"weight": 0.5}, {"weight": GRADIENT}, {"weight": 0.2}],
    ),
    "multislerp_no_base": (
        {"merge_method": "multislerp", "parameters": {"normalize_weights": False}, **NOBASE},
        [{"weight": 0.4}, {"weight": 0.3}],
    ),
    # the base is averaged like the models (mergekit adds it as an input)
    "karcher": ({"merge_method": "karcher", "parameters": {"max_iter": [1, 5]}}, [{}, {}]),
    "sce": ({"merge_method": "sce", "parameters": {"select_topk": [0.3, 1.0]}}, [{}, {}, {}]),
    "nearswap": ({"merge_method": "nearswap", "parameters": {"t": 0.2}}, [{}]),
    "arcee_fusion": ({"merge_method": "arcee_fusion"}, [{}]),
    "passthrough": (
        {"merge_method": "passthrough", **NOBASE},
        [{"scale": [{"filter": "o_proj", "value": 0.0}, {"value": [1.0, 2.0]}]}],
    ),
    "ram": ({"merge_method": "ram", "parameters": {"epsilon": 0.3}}, [{}, {}, {}]),
    "ramplus_tl": (
        {"merge_method": "ramplus_tl", "parameters": {"epsilon": 0.3, "r": 0.5, "alpha": 0.6}},
        [{}, {}, {}],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(family, tensors, tmp_path, case):
    cfg, settings = CASES[case]
    ours, theirs = run_both(family, tmp_path, {**cfg, "models": entries(family, *settings)})
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=TOL, atol=TOL, err_msg=name)
    if case == "passthrough":  # ft1 scaled: 0 on o_proj, else 1 -> 2 over the layers
        ft = tensors[1]
        assert not ours["model.layers.1.self_attn.o_proj.weight"].any()
        np.testing.assert_array_equal(
            ours["model.embed_tokens.weight"], ft["model.embed_tokens.weight"]
        )
        name = "model.layers.2.mlp.up_proj.weight"
        np.testing.assert_array_equal(ours[name], 2 * ft[name])
        return
    # Not a trivial answer: on most tensors the merge is none of its inputs.
    for given in tensors[: len(settings) + 1]:
        moved = [n for n in ours if np.max(np.abs(ours[n] - given[n])) > 1e-3]
        assert len(moved) > len(ours) // 2, (case, len(moved))


def test_nearswap_takes_close_values(family, tensors, tmp_path):
    # t = 0.2 on differences of size ~0.3: the model's value where |Δ| <= t, else
    # w = t / |Δ| of the way towards it.
    cfg = {"merge_method": "nearswap", "base_model": str(family[0]), "dtype": "float32"}
    cfg.update(parameters={"t": 0.2}, models=entries(family, {}))
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    out = load_file(tmp_path / "out" / "model.safetensors")[name]
    base, ft = tensors[0][name], tensors[1][name]
    diff = np.abs(ft - base)
    swapped = diff <= 0.2
    assert 0.3 < swapped.mean() < 0.7
    np.testing.assert_allclose(out[swapped], ft[swapped], atol=1e-6)
    w = 0.2 / diff[~swapped]
    want = w * ft[~swapped] + (1 - w) * base[~swapped]
    np.testing.assert_allclose(out[~swapped], want, atol=1e-6)


# ------------------------------------------------------- edge cases, tensor by tensor


def mergekit_group(name, arrays, base_index=None, **parameters):
    group = TensorGroup.from_tensors([torch.from_numpy(a) for a in arrays], base_index=base_index)
    return mk.get(name)([group], parameters=parameters)[0].numpy()


RNG = np.random.default_rng(7)
A = RNG.normal(size=(6, 10)).astype(np.float32)
B = RNG.normal(size=(6, 10)).astype(np.float32)


def test_nuslerp_colinear_rows_interpolate_linearly():
    b = B.copy()
    b[:3] = 2.5 * A[:3]  # rows 0-2 colinear: linear interpolation there
    for flatten in (False, True):
        theirs = mergekit_group("nuslerp", [A, b], weight=[1.0, 3.0], nuslerp_flatten=flatten)
        ours = nuslerp.nuslerp(0.75, A, b, flatten=flatten)
        np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
        if not flatten:
            np.testing.assert_allclose(ours[:3], 0.25 * A[:3] + 0.75 * b[:3], rtol=TOL)
            assert not np.allclose(ours[3:], 0.25 * A[3:] + 0.75 * b[3:], atol=1e-2)
    # weights summing to ~0: t = 0.5
    np.testing.assert_allclose(
        nuslerp.nuslerp(nuslerp.nuslerp_t(np.array([1.0, -1.0])), A, B),
        mergekit_group("nuslerp", [A, B], weight=[1.0, -1.0]),
        rtol=TOL,
        atol=TOL,
    )


def test_multislerp_degenerate_mean_falls_back_to_the_weighted_sum():
    # Opposite task vectors with equal weights: the mean direction vanishes (values on
    # a 1/16 grid, so that base ± A and their differences are exact).
    base, a = np.round(B * 16) / 16, np.round(A * 16) / 16
    models = np.stack([base + a, base - a])
    theirs = mergekit_group("multislerp", [*models, base], base_index=2, weight=[1.0, 1.0])
    ours = multislerp.multislerp(models, np.array([1.0, 1.0]), base)
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(ours, base, atol=1e-6)
    # Three unchanged models: mergekit raises; dem-jax keeps the base (weighted sum).
    same = np.stack([base, base, base])
    with pytest.raises(ValueError, match="weighted sum"):
        mergekit_group("multislerp", [*same, base], base_index=3, weight=[1.0, 1.0, 1.0])
    np.testing.assert_array_equal(multislerp.multislerp(same, np.ones(3), base), base)


def test_karcher_zero_and_tiny_inputs():
    zero = np.zeros_like(A)
    for arrays in ([A, zero, B], [zero, zero], [A, 1e-7 * B, B, 2 * A]):
        theirs = mergekit_group("karcher", arrays)
        ours = karcher.karcher(np.stack(arrays))
        np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    assert not np.allclose(ours, np.mean(arrays, axis=0), atol=1e-3)  # not the plain mean


def test_sce_equal_weights_when_changes_are_tiny():
    # Mean squares sum below 1e-6: mergekit falls back to equal weights 1/N.
    deltas = np.stack([1e-4 * A, -2e-4 * A, 3e-4 * B])
    theirs = mergekit_group("sce", [B, *(B + deltas)], base_index=0, select_topk=0.5)
    ours = sce.sce(B, (B + deltas) - B, select_topk=0.5)
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(sce.sce_weights(deltas), np.full(3, 1 / 3), rtol=1e-6)


# ------------------------------------------------------------------ bad input

# (method, models, their parameters, global parameters, what the one line says)
BAD = [
    ("nuslerp", 3, {"weight": 1}, {}, "nuslerp needs 2 model(s) besides the base, got 3"),
    ("nuslerp", 2, {}, {}, "missing parameter weight for tensor"),
    ("nearswap", 1, {}, {}, "missing parameter t for tensor"),
    ("nearswap", 1, {}, {"t": -1}, "parameters.t: t must be >= 0.0"),
    ("arcee_fusion", 2, {}, {}, "arcee_fusion needs 1 model(s) besides the base, got 2"),
    ("karcher", 2, {}, {"max_iter": 2.5}, "max_iter must be a whole number, got 2.5"),
    # a gradient 1 -> 2 over three layers lands on 1.5 in the middle one
    ("karcher", 2, {}, {"max_iter": [1, 2]}, "max_iter must be a whole number, got 1.5"),
    ("sce", 2, {}, {"select_topk": 1.5}, "select_topk must be in [0.0, 1.0]"),
    ("sce", 2, {"weight": 1}, {}, "sce takes no parameter 'weight'"),
    ("ram", 2, {}, {"epsilon": "x"}, "epsilon must be a number"),
    ("ramplus_tl", 2, {"r": 1}, {}, "r is one value for the whole merge"),
    ("passthrough", 1, {}, {}, "passthrough needs 1 model(s) counting the base model, got 2"),
    ("multislerp", 2, {"weight": 1}, {"normalize_weights": 1}, "must be true or false"),
]


@pytest.mark.parametrize("method, n, settings, params, needle", BAD, ids=[b[4][:40] for b in BAD])
def test_bad_settings_are_one_line_errors(family, tmp_path, method, n, settings, params, needle):
    cfg = {"merge_method": method, "base_model": str(family[0]), "parameters": params}
    cfg["models"] = entries(family, *[settings] * n)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(DemError) as err:
        merge_from_config(path, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and needle in message and str(path) in message, message
    assert not (tmp_path / "out").exists()
