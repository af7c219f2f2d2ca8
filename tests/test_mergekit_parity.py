"""Parity with the real mergekit 0.1.5 on tiny random Hugging Face models.

The same MERGE.yaml is run by mergekit (its Python API, CPU, float32) and by
``dem_jax.merge.from_config.merge_from_config``; every tensor of the two outputs is compared.
Tolerance 1e-6 absolute: both compute in float32 but sum in different orders
(torch vs XLA reductions), a few ulps of values below ~1.3.

Random methods cannot match draw for draw (torch's RNG vs jax's), so they are
compared exactly at density 1 (no drop) and statistically below it.
"""

from __future__ import annotations

# mergekit is a test extra: the reference these tests exist for, so no skip if missing.
import mergekit  # noqa: F401
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from test_merge import make_family

from dem_jax.merge.from_config import merge_from_config

TOL = 1e-6


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("pfamily"), n=3)


def run_both(family, tmp_path, cfg, theirs_as=None):
    """Run ``cfg`` through mergekit and dem-jax; their tensors, by name (mergekit's
    passed through ``theirs_as`` first, when given)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = {"base_model": str(family[0]), "dtype": "float32", **cfg}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(tmp_path / "mk"),
        MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False),
    )
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "ours")
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    theirs = theirs if theirs_as is None else theirs_as(theirs)
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    return ours, theirs


def models(family, *settings):
    return [{"model": str(p), "parameters": s} for p, s in zip(family[1:], settings, strict=False)]


GRADIENT = [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.5}]
EXACT = {
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "models": None,  # filled by models(): weights with a filter and a layer gradient
        "parameters": {"lambda": 0.8},
    },
    "ties": {
        "merge_method": "ties",
        "parameters": {
            "normalize": [{"filter": "layers.1.", "value": False}, {"value": True}],
            "int8_mask": True,
        },
    },
    "linear": {"merge_method": "linear", "parameters": {"weight": 0.5, "normalize": True}},
    "breadcrumbs": {"merge_method": "breadcrumbs", "parameters": {"rescale": True}},
    "slerp": {
        "merge_method": "slerp",
        "parameters": {"t": [{"filter": "mlp", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "parameters": {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
    },
    "dare_ties": {"merge_method": "dare_ties"},
    "della": {"merge_method": "della", "parameters": {"epsilon": 0.1}},
}
SETTINGS = {
    "task_arithmetic": [{"weight": GRADIENT}, {"weight": -0.3}, {"weight": 0.9}],
    "ties": [
        {"weight": 0.7, "density": 0.5},
        {"weight": 0.3, "density": 0.3},
        {"weight": 0.5, "density": [0.2, 0.9]},
    ],
    "linear": [{"weight": 0.7}, {"weight": GRADIENT}],
    "breadcrumbs": [
        {"weight": 0.6, "density": 0.8, "gamma": 0.05},
        {"weight": 0.4, "density": 0.5},
    ],
    "slerp": [{}],
    "model_stock": [{}, {}, {}],
    "dare_ties": [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}],
    "della": [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}],
}


@pytest.mark.parametrize("name", list(EXACT))
def test_same_tensors_as_mergekit(family, tmp_path, name):
    cfg = {k: v for k, v in EXACT[name].items() if k != "models"}
    cfg["models"] = models(family, *SETTINGS[name])
    ours, theirs = run_both(family, tmp_path, cfg)
    worst = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
    assert worst <= TOL, {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours}


def test_slices_form_as_mergekit(family, tmp_path):
    cfg = {
        "merge_method": "slerp",
        "slices": [{"sources": [{"model": str(p), "layer_range": [0, 3]} for p in family[:2]]}],
        "parameters": {"t": [0.0, 1.0]},
    }
    ours, theirs = run_both(family, tmp_path, cfg)
    assert max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours) <= TOL


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drop_statistics_match_mergekit(family, tmp_path, method):
    # One model, weight 1, density 0.5, rescale true: merged - base is the kept part of
    # the delta, scaled so its L1 norm equals the delta's (mergekit 0.1.5), so per
    # tensor: kept values are delta * c for one c, and the L1 norm is preserved.
    # DELLA keeps the larger half of each row with probability 0.5 + eps/2 on average
    # and the smaller half with 0.5 - eps/2.
    eps = 0.3
    params = {"weight": 1.0, "density": 0.5}
    cfg = {"merge_method": method, "models": models(family, params)}
    if method == "della_linear":
        cfg["parameters"] = {"epsilon": eps}
    ours, theirs = run_both(family, tmp_path, cfg)
    base, ft = (
        load_file(family[0] / "model.safetensors"),
        load_file(family[1] / "model.safetensors"),
    )
    stats = {}
    for label, out in (("ours", ours), ("mergekit", theirs)):
        kept = total = big_kept = big_total = 0
        for name, merged in out.items():
            delta = ft[name] - base[name]
            keep = merged != base[name]
            nz = delta != 0
            # one scale per tensor: the L1 norm of the delta over that of its kept part
            scale = np.abs(delta).sum() / np.abs(delta[keep]).sum()
            want = base[name] + np.where(keep, delta * scale, 0)
            np.testing.assert_allclose(merged, want, rtol=0, atol=1e-6, err_msg=f"{label} {name}")
            kept, total = kept + keep[nz].sum(), total + nz.sum()
            if delta.ndim == 2:  # mergekit ranks within rows (torch dim 1)
                big = np.abs(delta) >= np.median(np.abs(delta), axis=1, keepdims=True)
                big_kept, big_total = big_kept + (keep & big).sum(), big_total + big.sum()
        stats[label] = (kept / total, big_kept / big_total)
    n = 60_000  # about the number of elements: binomial sd of a fraction ~ 0.5 / sqrt(n)
    for label, (frac, big_frac) in stats.items():
        assert abs(frac - 0.5) < 5 * 0.5 / np.sqrt(n), (label, stats)
        want_big = 0.5 + eps / 2 if method == "della_linear" else 0.5
        assert abs(big_frac - want_big) < 0.02, (label, stats)
    assert abs(stats["ours"][1] - stats["mergekit"][1]) < 0.02
