"""TaskPGM proportions (`dem-jax mixture`, data.mixture: taskpgm) and the fisher /
regmean pipeline baselines, on tiny randomly initialised "fine-tunes"."""

import json

import jax
import numpy as np
import pytest
from test_pipeline import TINY_DATA, mini_config

import dem_jax
from dem_jax.cli import main
from dem_jax.config.loader import load_run_config
from dem_jax.config.model import ModelConfig
from dem_jax.config.run import DataConfig
from dem_jax.data.batches import encode_records, pad_batches
from dem_jax.data.pipeline import Split, mixture_weights
from dem_jax.data.records import read_jsonl
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.errors import DemError
from dem_jax.io.run_layout import RunLayout
from dem_jax.merge.methods.fisher import diagonal_fisher, fisher_merge
from dem_jax.merge.methods.regmean import gram_matrices, regmean_merge
from dem_jax.mixture.taskpgm import taskpgm_proportions

NAMES = ("reverse", "sort")
TINY_MODEL = ModelConfig(
    vocab_size=55, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run whose fine-tunes are random models (different seeds) saved where training puts them."""
    out = tmp_path_factory.mktemp("mixture") / "run"
    config = mini_config(out)
    layout = RunLayout(out)
    layout.model(NAMES[0]).parent.mkdir(parents=True)
    for seed, name in enumerate(NAMES):
        dem_jax.save_model(dem_jax.init_model(TINY_MODEL, seed=seed), layout.model(name))
    return out, config


@pytest.mark.parametrize("similarity", ["pmi", "jsd"])
def test_mixture_command_writes_proportions_of_the_written_similarity(run_dir, similarity, capsys):
    out, config = run_dir
    assert main(["mixture", str(config), f"pipeline.taskpgm.similarity={similarity}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    mix = out / "mixture"
    proportions = json.loads((mix / "proportions.json").read_text())
    sim = json.loads((mix / "similarity.json").read_text())
    assert (mix / "heatmap.png").stat().st_size > 1000
    assert printed == proportions and list(proportions) == list(NAMES)
    # Both measures are written; `similarity` names the one the proportions use.
    assert sim["names"] == list(NAMES) and sim["similarity"] == similarity
    assert set(sim) == {"names", "similarity", "pmi", "jsd"}
    for measure, diagonal in (("pmi", 0.0), ("jsd", 1.0)):
        M = np.array(sim[measure])
        assert M.shape == (2, 2) and np.allclose(M, M.T), measure
        assert np.allclose(np.diag(M), diagonal), measure
    assert np.array(sim["pmi"])[0, 1] < 0 and 0 < np.array(sim["jsd"])[0, 1] < 1
    S = np.array(sim[similarity])
    p = np.array([proportions[n] for n in NAMES])
    assert np.all(p >= 0) and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, taskpgm_proportions(S), rtol=0, atol=1e-12)
    assert not list(out.glob(".mixture.tmp-*"))


def test_mixture_names_a_missing_finetune(run_dir, tmp_path, capsys):
    out, _ = run_dir
    config = mini_config(out, names=(*NAMES, "arithmetic"))  # no models/arithmetic
    assert main(["mixture", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(out / "models" / "arithmetic") in err and "dem-jax train" in err


def test_data_mixture_taskpgm_reads_the_proportions_file(tmp_path):
    data = DataConfig(mixture="taskpgm")
    splits = {n: Split(n, [], 10, 1) for n in NAMES}
    path = tmp_path / "proportions.json"
    path.write_text(json.dumps({"reverse": 0.25, "sort": 0.5, "other": 0.25}))
    assert mixture_weights(data, splits, path) == {
        "reverse": pytest.approx(1 / 3),
        "sort": pytest.approx(2 / 3),
    }
    with pytest.raises(DemError, match="dem-jax mixture"):
        mixture_weights(data, splits, tmp_path / "absent.json")
    with pytest.raises(DemError, match="must be 'uniform', 'size', 'taskpgm'"):
        DataConfig(mixture="taskpgmm")


def test_train_with_taskpgm_mixture_but_no_proportions_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    config = mini_config(out)
    assert main(["train", str(config), "--mixture", "data.mixture=taskpgm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out / "mixture" / "proportions.json") in err and "dem-jax mixture" in err


def _batches(name, n_examples, batch_size=8):
    """The validation rows the baselines use, built independently of the pipeline."""
    tok = load_tokenizer(TINY_DATA / "tokenizer")
    records = read_jsonl(TINY_DATA / f"{name}.val.jsonl")[:n_examples]
    return pad_batches(encode_records(records, tok, 32, False).rows, batch_size)


def test_fisher_and_regmean_baselines_equal_the_direct_merges(run_dir):
    from dem_jax.pipeline.run import _baselines
    from dem_jax.pipeline.state import StageState

    out, config = run_dir
    cfg = load_run_config(config, ["pipeline.baselines=[fisher, regmean]"])
    layout = RunLayout(out)
    base = dem_jax.init_model(TINY_MODEL, seed=7)
    state = StageState(out / "pipeline_state.json")
    made = _baselines(cfg, None, base, list(NAMES), layout, state, lambda m: None)
    assert set(made) == {"fisher", "regmean"} and made["regmean"]["alpha"] == 0.9

    models = [dem_jax.load_model(layout.model(n), dtype="float32") for n in NAMES]
    params = [m.params for m in models]
    batches = [_batches(n, cfg.pipeline.eval_max_examples) for n in NAMES]
    fishers = [diagonal_fisher(p, TINY_MODEL, b) for p, b in zip(params, batches, strict=True)]
    grams = [gram_matrices(p, TINY_MODEL, b) for p, b in zip(params, batches, strict=True)]
    expected = {
        "fisher": fisher_merge(params, fishers),
        "regmean": regmean_merge(params, grams, alpha=0.9),
    }
    for kind, want in expected.items():
        got = dem_jax.load_model(layout.model(kind))
        assert got.metadata["baseline"] == kind
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # A second call finds both complete and leaves them alone.
    stamp = (layout.model("fisher") / "dem_jax_model.json").stat().st_mtime_ns
    _baselines(cfg, None, base, list(NAMES), layout, state, lambda m: None)
    assert (layout.model("fisher") / "dem_jax_model.json").stat().st_mtime_ns == stamp
