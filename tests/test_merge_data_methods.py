"""``dem-jax merge`` with the data-aware methods (merge_method: fisher / regmean, a
per-model ``data`` file): the CLI against the library functions on the same batches,
sharded statistics against single-device ones, and bad input ending in exit 2."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_merge import make_family
from test_merge_yaml import run, write

import dem_jax
from dem_jax.config.merge import DataOptions
from dem_jax.data.batches import encode_records, pad_batches
from dem_jax.data.records import read_jsonl
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.errors import DemError
from dem_jax.merge import engine as M
from dem_jax.merge.methods import fisher, regmean
from dem_jax.merge.registry import get_method
from dem_jax.merge.request import load_merge_config
from dem_jax.sharding.rules import param_shardings

SEQ_LEN, BATCH, MAX_EXAMPLES = 16, 4, 10
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def write_data(path, words: range, n: int, seed: int) -> None:
    """JSONL over the test tokenizer's words w3..w100: text and prompt/completion records."""
    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(f"w{w}" for w in rng.choice(words, k))

    lines = []
    for i in range(n):
        if i % 3 == 2:
            record = {"prompt": text(3), "completion": text(int(rng.integers(2, 8)))}
        else:
            record = {"text": text(int(rng.integers(4, 22)))}  # some longer than one row
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, two fine-tunes (HF, float32) and one data file per fine-tune."""
    paths = make_family(tmp_path_factory.mktemp("dfamily"), n=2)
    folder = paths[0].parent
    (folder / "data").mkdir()
    write_data(folder / "data" / "a.jsonl", range(3, 50), 14, seed=0)
    write_data(folder / "data" / "b.jsonl", range(50, 101), 14, seed=1)
    return paths


def data_config(method, parameters=None, model_parameters=(None, None), **top):
    models = []
    for name, data, settings in zip(("ft1", "ft2"), ("a", "b"), model_parameters, strict=True):
        entry = {"model": name, "data": f"data/{data}.jsonl"}
        if settings is not None:
            entry["parameters"] = settings
        models.append(entry)
    cfg = {"merge_method": method, "base_model": "base", "models": models}
    cfg.update(seq_len=SEQ_LEN, batch_size=BATCH, max_examples=MAX_EXAMPLES)
    if parameters is not None:
        cfg["parameters"] = parameters
    cfg.update(top)
    return cfg


def direct_inputs(family, mesh=None):
    """Each fine-tune (float32) and its batches, built here from the documented recipe."""
    folder = family[0].parent
    tok = load_tokenizer(family[0])
    models = [dem_jax.load_model(p, mesh=mesh, dtype="float32") for p in family[1:]]
    batches = [
        pad_batches(
            encode_records(read_jsonl(folder / "data" / f)[:MAX_EXAMPLES], tok, SEQ_LEN).rows,
            BATCH,
        )
        for f in ("a.jsonl", "b.jsonl")
    ]
    return models, batches


def assert_params_close(got, want, rtol):
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for a, b in zip(flat_got, flat_want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def test_yaml_data_paths_options_and_slices(family):
    folder = family[0].parent
    req = load_merge_config(write(folder, data_config("regmean", add_eos=False), "p.yaml"))
    assert req.base == family[0] and req.models == family[1:]  # the base is not an input
    assert req.model_data == [folder / "data" / "a.jsonl", folder / "data" / "b.jsonl"]
    assert req.data_options == DataOptions(
        SEQ_LEN, BATCH, MAX_EXAMPLES, "{prompt}", add_bos=True, add_eos=False
    )
    sources = [
        {"model": m, "layer_range": [0, 3], "data": str(folder / "data" / f)}
        for m, f in (("ft1", "a.jsonl"), ("ft2", "b.jsonl"))
    ]
    cfg = {"merge_method": "fisher", "slices": [{"sources": sources}]}
    req = load_merge_config(write(folder, cfg, "s.yaml"))
    assert req.model_data == [folder / "data" / "a.jsonl", folder / "data" / "b.jsonl"]
    assert req.data_options == DataOptions()  # defaults: 512, 8, all
    with pytest.raises(DemError, match=r"slices\[0\].sources\[0\].data: merge_method linear"):
        load_merge_config(write(folder, {**cfg, "merge_method": "linear"}, "l.yaml"))


def test_cli_fisher_on_a_mesh_equals_fisher_merge(capsys, family, tmp_path):
    params = {"fisher_floor": 1e-5}
    cfg = data_config("fisher", params, ({"weight": 0.3}, {"weight": 1.0}))
    path = write(family[0].parent, cfg, "fisher.yaml")
    mesh_arg = ",".join(f"{k}={v}" for k, v in MESH.items())
    code, err = run(capsys, "merge", path, "--out", tmp_path / "hf", "--mesh", mesh_arg)
    assert code == 0, err
    # The same Fishers on the same mesh (sharded = single-device is tested below).
    mesh = dem_jax.make_mesh(**MESH)
    models, batches = direct_inputs(family, mesh)
    ps = [m.params for m in models]
    fishers = [
        fisher.diagonal_fisher(p, m.config, b, mesh=mesh)
        for p, m, b in zip(ps, models, batches, strict=True)
    ]
    want = fisher.fisher_merge(ps, fishers, weights=[0.3, 1.0], eps=1e-5)
    got = dem_jax.load_model(tmp_path / "hf")
    assert got.config.param_dtype == "float32"
    assert sorted(p.name for p in (tmp_path / "hf").glob("tokenizer*"))  # the base's files
    assert_params_close(got.params, want, rtol=1e-5)
    # Not the plain weighted average: the Fishers matter.
    avg = jax.tree.map(lambda a, b: (0.3 * a + b) / 1.3, *ps)
    q = "layers", "attn", "q_proj", "kernel"
    diff = np.asarray(got.params[q[0]][q[1]][q[2]][q[3]]) - np.asarray(avg[q[0]][q[1]][q[2]][q[3]])
    assert np.abs(diff).max() > 1e-3
    assert get_method("fisher").spec("fisher_floor").default == fisher.DEFAULT_FISHER_FLOOR


def test_cli_regmean_equals_regmean_merge(capsys, family, tmp_path):
    cfg = data_config("regmean", {"alpha": 0.7, "ridge": 1e-4})
    path = write(family[0].parent, cfg, "regmean.yaml")
    out = tmp_path / "orbax"
    code, err = run(capsys, "merge", path, "--out", out, "--format", "orbax")
    assert code == 0, err
    models, batches = direct_inputs(family)
    ps = [m.params for m in models]
    grams = [
        regmean.gram_matrices(p, m.config, b) for p, m, b in zip(ps, models, batches, strict=True)
    ]
    want = regmean.regmean_merge(ps, grams, alpha=0.7, ridge=1e-4)
    got = dem_jax.load_model(out)
    assert_params_close(got.params, want, rtol=1e-5)
    meta = got.metadata["merge"]
    assert meta["method"] == "regmean" and meta["parameters"] == {
        "models": [{}, {}],
        "alpha": 0.7,
        "ridge": 1e-4,
    }
    folder = family[0].parent
    assert meta["data"] == [str(folder / "data" / "a.jsonl"), str(folder / "data" / "b.jsonl")]
    assert meta["data_options"]["seq_len"] == SEQ_LEN


def test_sharded_fisher_and_grams_equal_single_device(family):
    # The CLI test's model, data and mesh (every axis: batches split over data*fsdp,
    # parameters over fsdp and tensor), so its compiled sharded pass is reused.
    mesh = dem_jax.make_mesh(**MESH)
    models, batches = direct_inputs(family)
    params, config = models[0].params, models[0].config
    one_f = fisher.diagonal_fisher(params, config, batches[0])
    many_f = fisher.diagonal_fisher(params, config, batches[0], mesh=mesh)
    shardings = jax.tree.leaves(param_shardings(config, mesh))
    for x, sharding in zip(jax.tree.leaves(many_f), shardings, strict=True):
        assert x.sharding.is_equivalent_to(sharding, x.ndim)
    assert_params_close(many_f, one_f, rtol=1e-5)
    one_g = regmean.gram_matrices(params, config, batches[0])
    many_g = regmean.gram_matrices(params, config, batches[0], mesh=mesh)
    assert set(many_g) == set(one_g) and float(many_g["tokens"]) == float(one_g["tokens"])
    want_shardings = regmean.gram_shardings(config, mesh)
    for key, x in many_g.items():
        assert x.sharding.is_equivalent_to(want_shardings[key], x.ndim), key
        np.testing.assert_allclose(
            x, one_g[key], rtol=1e-5, atol=1e-6 * float(np.abs(one_g[key]).max()), err_msg=key
        )
    # Some Gram is split across devices (not merely replicated).
    assert any(not x.sharding.is_fully_replicated for x in many_g.values())


BAD = [
    (
        data_config("fisher", models=[{"model": "ft1", "data": "data/a.jsonl"}, {"model": "ft2"}]),
        "models[1].data: merge_method fisher needs a data file per model",
    ),
    ({**data_config("ties"), "seq_len": 8}, "seq_len: merge_method ties reads no data"),
    (
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": "ft1", "data": "data/a.jsonl", "parameters": {"weight": 1}}],
        },
        "models[0].data: merge_method ties reads no data (only fisher, regmean do)",
    ),
    (
        data_config("fisher", models=[{"model": "ft1", "data": "data/nope.jsonl"}]),
        "models[0].data: data file 'data/nope.jsonl' does not exist",
    ),
    (
        data_config("fisher", None, ({"weight": [0.1, 1.0]}, None)),
        "models[0].parameters.weight: merge_method fisher takes a single number",
    ),
    (
        data_config("fisher", None, ({"weight": -1.0}, None)),
        "weight must be >= 0.0, got -1.0",
    ),
    (
        data_config("fisher", None, ({"weight": 0.0}, {"weight": 0.0})),
        "fisher needs at least one model with weight > 0",
    ),
    (data_config("fisher", {"fisher_floor": 0.0}), "fisher_floor must be > 0"),
    (data_config("regmean", {"alpha": 1.5}), "alpha must be in [0.0, 1.0], got 1.5"),
    (data_config("regmean", {"weight": 1.0}), "regmean takes no parameter 'weight'"),
    (data_config("regmean", batch_size=0), "batch_size: expected an integer >= 1, got 0"),
    (data_config("regmean", prompt_template="Q:"), "prompt_template: expected a string"),
    (
        data_config("regmean", models=[{"model": "ft1", "data": "data/a.jsonl"}]),
        "merge_method regmean needs at least 2 models, got 1",
    ),
    (
        data_config(
            "regmean",
            models=[
                {"model": "ft1", "data": "bad.jsonl"},
                {"model": "ft2", "data": "data/b.jsonl"},
            ],
        ),
        "bad.jsonl:2: malformed JSON",
    ),
]


def test_bad_data_merges_exit_2_with_one_line(capsys, family, tmp_path):
    folder = family[0].parent
    (folder / "bad.jsonl").write_text('{"text": "w3 w4 w5"}\n{"text": \n')
    for i, (cfg, needle) in enumerate(BAD):
        path = write(folder, cfg, f"bad_data{i}.yaml")
        code, err = run(capsys, "merge", path, "--out", tmp_path / "out")
        lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (needle, err)
        assert needle in lines[0] and str(path) in lines[0], (needle, lines[0])
        assert not (tmp_path / "out").exists()
    # A batch that does not split over the mesh's data-parallel axes.
    path = write(folder, data_config("fisher", batch_size=6), "bad_mesh.yaml")
    code, err = run(capsys, "merge", path, "--out", tmp_path / "out", "--mesh", "data=4,fsdp=2")
    assert code == 2 and "batch_size: 6 must be a positive multiple" in err, err
    assert not (tmp_path / "out").exists()
    # The leaf-by-leaf engine does not take them: it has no data.
    with pytest.raises(DemError, match="fisher needs data per model"):
        M.merge("fisher", None, family[1:])


def test_vector_inputs_are_refused(capsys, family, tmp_path):
    from dem_jax.vectors.store import save_vector
    from dem_jax.vectors.vector import distribution_vector

    base, ft = (dem_jax.load_model(p) for p in family[:2])
    save_vector(distribution_vector(base, ft, name="a"), tmp_path / "vec")
    cfg = data_config(
        "fisher",
        models=[
            {"model": str(tmp_path / "vec"), "data": "data/a.jsonl"},
            {"model": "ft2", "data": "data/b.jsonl"},
        ],
        tokenizer_source="base",
    )
    path = write(family[0].parent, cfg, "vec.yaml")
    code, err = run(capsys, "merge", path, "--out", tmp_path / "out")
    assert code == 2 and "needs model directories, not distribution vectors" in err, err
    assert not (tmp_path / "out").exists()
