"""mergekit's ``modules:`` form and ``residual_weight`` against mergekit 0.1.5.

dem-jax's families have one module, ``default`` (as mergekit names it), so
``modules: {default: {...}}`` is the top-level merge with the module's ``parameters``
as one more scope, between a slice's and the global ones. A setting whose filters match
nothing in a scope falls through to the next, so the scopes are not a merged dict:
these merges check the order on filters that match some tensors only.
"""

from __future__ import annotations

import pytest
import yaml
from test_merge_options import assert_same_tensors, run_mergekit
from test_merge_slices import src
from test_merge_yaml import run as run_cli

from dem_jax.merge.from_config import merge_from_config


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from test_merge import make_family

    return make_family(tmp_path_factory.mktemp("mfamily"), n=2)  # base, ft1, ft2; 3 layers


def both(tmp_path, cfg, **ours):
    cfg = {"dtype": "float32", **cfg}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    run_mergekit(cfg, tmp_path / "mk", copy_tokenizer=False)
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "ours", **ours)
    return tmp_path / "ours", tmp_path / "mk"


# The module's density applies to the MLPs only; every other tensor falls through to
# the global one. A filtered module weight for ft1 likewise falls through on attention.
MODULE_PARAMS = {"density": [{"filter": "mlp", "value": 0.3}]}
GLOBAL_PARAMS = {"density": 0.8, "normalize": True}


@pytest.mark.parametrize("engine", ["host", "jax"])
def test_modules_models_as_mergekit(family, tmp_path, engine):
    base, ft1, ft2 = family
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": GLOBAL_PARAMS,
        "modules": {
            "default": {
                "models": [
                    {"model": str(ft1), "parameters": {"weight": 0.7}},
                    {"model": str(ft2), "parameters": {"weight": 0.4}},
                ],
                "parameters": MODULE_PARAMS,
            }
        },
    }
    ours, theirs = both(tmp_path, cfg, engine=engine)
    assert_same_tensors(ours, theirs)


def test_module_settings_sit_between_the_slices_and_the_top(family, tmp_path):
    base, ft1, ft2 = family
    w = {"weight": 0.5}
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": GLOBAL_PARAMS,
        "modules": {
            "default": {
                "parameters": {**MODULE_PARAMS, "normalize": False},
                "slices": [
                    {
                        # the slice's own density wins on attention; MLPs take the module's
                        "parameters": {"density": [{"filter": "self_attn", "value": 0.6}]},
                        "residual_weight": 0.25,  # parsed and ignored by mergekit 0.1.5
                        "sources": [src(base, 0, 2), src(ft1, 1, 3, **w), src(ft2, 0, 2, **w)],
                    },
                    {"sources": [src(base, 1, 3), src(ft1, 1, 3, **w), src(ft2, 1, 3, **w)]},
                ],
            }
        },
    }
    ours, theirs = both(tmp_path, cfg)
    assert_same_tensors(ours, theirs)


def test_residual_weight_is_ignored_with_a_warning(capsys, family, tmp_path):
    base, ft1, _ = family
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {
                "sources": [src(base, 0, 3, weight=0.5), src(ft1, 0, 3, weight=0.5)],
                "residual_weight": 0.3,
            }
        ],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(capsys, "merge", path, "--out", tmp_path / "ours")
    assert code == 0, err
    assert "slices[0].residual_weight is ignored" in err
    run_mergekit(cfg, tmp_path / "mk", copy_tokenizer=False)
    assert_same_tensors(tmp_path / "ours", tmp_path / "mk")


def _bad(family):
    base, ft1, _ = family
    models = [{"model": str(ft1)}, {"model": str(base)}]
    lin = {"merge_method": "linear"}
    return [
        ({**lin, "modules": {"text": {"models": models}}}, "modules: dem-jax's model families"),
        (
            {**lin, "models": models, "modules": {"default": {"models": models}}},
            "give exactly one of 'models', 'slices' or 'modules'",
        ),
        ({**lin, "modules": {"default": {}}}, "modules.default: give exactly one of"),
        ({**lin, "modules": {"default": {"models": []}}}, "modules.default.models: expected a"),
        (
            {**lin, "modules": {"default": {"models": models, "parameters": {"density": 1}}}},
            "modules.default.parameters",
        ),
        (
            {**lin, "modules": {"default": {"models": [{"model": "nowhere"}]}}},
            "modules.default.models[0].model",
        ),
        (
            {**lin, "slices": [{"sources": [src(ft1, 0, 3)], "residual_weight": "x"}]},
            "slices[0].residual_weight: expected float",
        ),
    ]


def test_bad_modules_exit_2_with_one_line(capsys, family, tmp_path):
    for i, (cfg, needle) in enumerate(_bad(family)):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, err = run_cli(capsys, "merge", path, "--out", tmp_path / "out")
        lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert needle in lines[0], (needle, lines[0])
        assert not (tmp_path / "out").exists()
