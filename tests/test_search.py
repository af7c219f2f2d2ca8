"""Weight search: gradients against finite differences, the grid end to end (table,
chosen ω, merged model on disk), the other strategies, and bad input."""

import csv
import json

import jax
import numpy as np
import pytest
from hf_models import save_hf_model

import dem_jax
from dem_jax import cli
from dem_jax.config.run import SearchConfig
from dem_jax.data.batches import encode_records
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.io.modeldir import Model
from dem_jax.io.run_layout import RunLayout
from dem_jax.model.transformer import param_shapes
from dem_jax.search.edit import edit_params, layer_leaves
from dem_jax.search.objective import objective_value
from dem_jax.search.score import score_model
from dem_jax.search.scorer import MergeScorer
from dem_jax.search.strategies import run_search

NAMES = ("alpha", "beta")


def perturbed(params, seed, scale):
    """A stand-in fine-tune: the base moved along a random direction."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32), params
    )


def records(seed, n):
    """Text records; each distribution favours its own band of word ids."""
    rng = np.random.default_rng(seed)
    lo = 3 + 40 * seed
    return [
        {"text": " ".join(f"w{i}" for i in rng.integers(lo, lo + 40, rng.integers(4, 14)))}
        for _ in range(n)
    ]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run: base model, one perturbed "fine-tune" per distribution, data, config."""
    root = tmp_path_factory.mktemp("search")
    save_hf_model("llama_gqa", root / "hf")
    base = dem_jax.load_model(root / "hf")
    layout = RunLayout(root / "out")
    layout.model("x").parent.mkdir(parents=True)
    for i, name in enumerate(NAMES):
        ft = Model(base.config, perturbed(base.params, i, 0.02), base.hf_config, base.assets_dir)
        dem_jax.save_model(ft, layout.model(name))
    write_jsonl(root / "alpha.jsonl", records(0, 30))  # validation split off (10%)
    write_jsonl(root / "beta.jsonl", records(1, 12))
    write_jsonl(root / "beta_val.jsonl", records(1, 5))
    (root / "run.yaml").write_text(
        "output_dir: out\n"
        "model: {path: hf}\n"
        "mesh: {data: 1, fsdp: 2, tensor: 4}\n"
        "train: {param_dtype: float32}\n"
        "data:\n"
        "  seq_len: 12\n"
        "  packing: true\n"
        "  distributions:\n"
        "    alpha: {train: alpha.jsonl}\n"
        "    beta: {train: beta.jsonl, validation: beta_val.jsonl}\n"
        "search:\n"
        "  strategy: grid\n"
        "  grid: [0.0, 0.5, 1.0]\n"
        "  batch_size: 4\n"
    )
    return root


def main(argv):
    """Run the dem-jax CLI in process; returns its exit status."""
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def grid_run(run_dir):
    """`dem-jax search` once, on a (fsdp=2, tensor=4) mesh."""
    assert main(["search", run_dir / "run.yaml"]) == 0
    return RunLayout(run_dir / "out")


@pytest.fixture(scope="module")
def scorer(run_dir):
    """An in-memory scorer on one device, fine-tunes moved further for clear gradients."""
    base = dem_jax.load_model(run_dir / "hf")
    tokenizer = load_tokenizer(run_dir / "hf")
    sets = {
        name: encode_records(records(i, 6), tokenizer, seq_len=12, packing=True)
        for i, name in enumerate(NAMES)
    }
    vectors = [
        perturbed(jax.tree.map(np.zeros_like, base.params), 10 + i, 0.05) for i in range(len(NAMES))
    ]
    return MergeScorer(base.config, base.params, vectors, sets, batch_size=4)


def central_difference(scorer, omega, index, h=0.04):
    """d objective / d omega[index], central differences with Richardson extrapolation
    (4 D(h/2) - D(h)) / 3, which cancels the O(h^2) error term."""

    def d(step):
        up, down = omega.copy(), omega.copy()
        up[index] += step
        down[index] -= step
        return (scorer.evaluate(up).objective - scorer.evaluate(down).objective) / (2 * step)

    return (4 * d(h / 2) - d(h)) / 3


@pytest.mark.parametrize("objective", ["mean_log_ppl", "max_log_ppl"])
def test_gradient_matches_central_differences(scorer, objective):
    scorer.objective = objective
    try:
        omega = np.array([0.3, 0.8])
        grad = scorer.evaluate(omega, with_grad=True).grad
        fd = np.array([central_difference(scorer, omega, i) for i in range(2)])
        # float32 sums: objective noise ~1e-6 relative, ~1e-4 over 2h = 0.04, gives a
        # few 1e-5 in the difference; 1% of gradients of size 1e-2 is the tolerance.
        np.testing.assert_allclose(grad, fd, rtol=1e-2, atol=5e-5)
        assert np.abs(grad).min() > 1e-3  # large enough for the comparison to mean something
    finally:
        scorer.objective = "mean_log_ppl"


def test_per_layer_gradient_matches_central_differences(scorer):
    layers = scorer.config.num_layers
    omega = np.full((2, layers + 1), 0.4)
    omega[1] = np.linspace(0.2, 0.9, layers + 1)
    grad = scorer.evaluate(omega, with_grad=True).grad
    assert grad.shape == (2, layers + 1)
    for index in [(0, 0), (1, layers - 1), (0, layers), (1, layers)]:
        fd = central_difference(scorer, omega, index)
        np.testing.assert_allclose(grad[index], fd, rtol=1e-2, atol=5e-5)
    # Per-layer weights summed over a distribution's entries give the scalar ω gradient.
    flat = scorer.evaluate(np.array([0.4, 0.5]), with_grad=True).grad
    tied = scorer.evaluate(np.array([[0.4] * (layers + 1), [0.5] * (layers + 1)]), True).grad
    np.testing.assert_allclose(tied.sum(axis=1), flat, rtol=1e-4, atol=1e-6)


def test_per_layer_merge_weighs_each_layer():
    config = dem_jax.ModelConfig(
        vocab_size=13, hidden_size=8, intermediate_size=12, num_layers=3, num_heads=2,
        num_kv_heads=1,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = param_shapes(config)
    base, *vecs = [
        jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
        for _ in range(3)
    ]
    omega = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]])
    merged = edit_params(base, vecs, omega, layer_leaves(config))
    q = lambda p: np.asarray(p["layers"]["attn"]["q_proj"]["kernel"])  # noqa: E731
    for layer in range(3):
        want = q(base)[layer] + omega[0, layer] * q(vecs[0])[layer]
        want += omega[1, layer] * q(vecs[1])[layer]
        np.testing.assert_allclose(q(merged)[layer], want, rtol=1e-5, atol=1e-6)
    emb = lambda p: np.asarray(p["embed"]["embedding"])  # noqa: E731
    np.testing.assert_allclose(
        emb(merged), emb(base) + 4.0 * emb(vecs[0]) + 2.0 * emb(vecs[1]), rtol=1e-5, atol=1e-6
    )


def test_objectives_by_hand():
    m = np.array([2.0, 3.0, 2.5])
    assert objective_value(m)[0] == pytest.approx(2.5)
    value, grad = objective_value(m, "weighted_log_ppl", np.array([1.0, 0.0, 3.0]))
    assert value == pytest.approx((2.0 + 3 * 2.5) / 4) and grad.tolist() == [0.25, 0.0, 0.75]
    value, grad = objective_value(m, "max_log_ppl")
    assert value == 3.0 and grad.tolist() == [0.0, 1.0, 0.0]


def test_grid_returns_argmin_of_its_table(grid_run):
    table = json.loads((grid_run.search_dir / "candidates.json").read_text())
    chosen = json.loads((grid_run.search_dir / "chosen.json").read_text())
    objectives = [c["objective"] for c in table["candidates"]]
    assert len(objectives) == 9
    best = int(np.argmin(objectives))
    assert chosen["candidate"] == best and chosen["objective_value"] == objectives[best]
    assert chosen["omega"] == table["candidates"][best]["omega"]
    with (grid_run.search_dir / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["objective"]) for r in rows] == pytest.approx(objectives, rel=1e-12)
    omegas = {(float(r["omega_alpha"]), float(r["omega_beta"])) for r in rows}
    assert omegas == {(a, b) for a in (0, 0.5, 1) for b in (0, 0.5, 1)}
    for c in table["candidates"]:  # the objective is the mean of the log-perplexities
        logs = [c["scores"][n]["mean_nll"] for n in NAMES]
        assert c["objective"] == pytest.approx(np.mean(logs), rel=1e-12)
    pytest.importorskip("matplotlib")
    assert (grid_run.search_dir / "search.png").stat().st_size > 1000


def validation_sets(run_dir):
    from dem_jax.config.loader import load_run_config
    from dem_jax.search.inputs import validation_records

    run = load_run_config(run_dir / "run.yaml")
    return {name: validation_records(run, name) for name in NAMES}


def test_merged_model_on_disk_scores_like_the_jitted_candidate(run_dir, grid_run):
    chosen = json.loads((grid_run.search_dir / "chosen.json").read_text())
    merged = dem_jax.load_model(grid_run.merged_model)  # one device; the search ran on 8
    assert merged.metadata["dem"]["omega"] == chosen["omega"]
    scores = score_model(merged, validation_sets(run_dir), batch_size=4, seq_len=12)
    for name in NAMES:
        assert scores[name].tokens == chosen["scores"][name]["tokens"]
        np.testing.assert_allclose(
            scores[name].mean_nll, chosen["scores"][name]["mean_nll"], rtol=1e-5
        )


def test_zero_omega_candidate_equals_the_base(run_dir, grid_run):
    table = json.loads((grid_run.search_dir / "candidates.json").read_text())
    (zero,) = [c for c in table["candidates"] if set(c["omega"].values()) == {0.0}]
    base = score_model(
        dem_jax.load_model(run_dir / "hf"), validation_sets(run_dir), batch_size=4, seq_len=12
    )
    for name in NAMES:
        np.testing.assert_allclose(zero["scores"][name]["mean_nll"], base[name].mean_nll, rtol=1e-5)
        assert zero["scores"][name]["bits_per_byte"] == pytest.approx(base[name].bits_per_byte)


def test_random_and_gradient_strategies(scorer):
    compiled = scorer._eval._cache_size()
    random = run_search(
        scorer, SearchConfig(strategy="random", samples=5, scale=1.5, seed=3), NAMES
    )
    omegas = np.array([c.omega for c in random.candidates])
    assert omegas.shape == (5, 2) and np.allclose(omegas.sum(axis=1), 1.5)
    assert (omegas >= 0).all() and len({tuple(o) for o in omegas.round(6)}) == 5
    assert scorer._eval._cache_size() - compiled <= 1  # ω is traced: no compile per candidate
    start = scorer.forward_equivalents
    cfg = SearchConfig(strategy="gradient", steps=4, learning_rate=0.2, init=0.0, per_layer=True)
    grad = run_search(scorer, cfg, NAMES)
    objectives = [c.objective for c in grad.candidates]
    assert grad.candidates[0].omega.shape == (2, scorer.config.num_layers + 1)
    assert objectives[-1] < objectives[0]  # descending
    assert scorer.forward_equivalents - start == 4 * 3  # forward + backward (= 2) per step


def test_bayes_on_the_real_scorer_writes_the_usual_outputs(scorer, tmp_path):
    from dem_jax.search.outputs import write_search_outputs

    compiled = scorer._eval._cache_size()
    start = scorer.forward_equivalents
    cfg = SearchConfig(strategy="bayes", samples=6, grid=[-0.5, 1.5], seed=1)
    result = run_search(scorer, cfg, NAMES)
    omegas = np.array([c.omega for c in result.candidates])
    assert omegas.shape == (6, 2) and omegas.min() >= -0.5 and omegas.max() <= 1.5
    assert scorer.forward_equivalents - start == 6
    assert scorer._eval._cache_size() - compiled <= 1  # no compile per trial
    again = scorer.evaluate(result.best.omega)
    assert again.objective == pytest.approx(result.best.objective, rel=1e-6)
    out = write_search_outputs(result, scorer, tmp_path / "search")
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["strategy"] == "bayes" and chosen["candidates_tried"] == 6
    assert chosen["candidate"] == result.best_index
    with (out / "candidates.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6


def write_config(run_dir, name, **search):
    cfg = (run_dir / "run.yaml").read_text()
    for key, value in search.items():
        cfg += f"  {key}: {value}\n"
    path = run_dir / name
    path.write_text(cfg)
    return path


@pytest.mark.parametrize(
    "case", ["unknown_distribution", "grid_unknown", "missing_finetune", "malformed", "no_config"]
)
def test_bad_input_exits_2_with_one_line(run_dir, capsys, case):
    argv, needle = ["search", run_dir / "run.yaml", "mesh.fsdp=8", "mesh.tensor=1"], None
    if case == "unknown_distribution":
        argv.append("search.distributions=[alpha, gamma]")
        needle = "search.distributions: unknown distribution 'gamma'"
    elif case == "grid_unknown":
        argv.append("search.grid={alpha: [0, 1], gamma: [1]}")
        needle = "search.grid: unknown distribution 'gamma'"
    elif case == "missing_finetune":
        argv.append(f"output_dir={run_dir / 'elsewhere'}")
        needle = f"{run_dir / 'elsewhere' / 'models' / 'alpha'}: fine-tuned model"
    elif case == "malformed":
        bad = write_jsonl(run_dir / "bad.jsonl", records(1, 3))
        bad.write_text(bad.read_text() + '{"text": \n')
        argv.append(f"data.distributions.beta.validation={bad}")
        needle = f"{bad}:4: malformed JSON"
    else:
        argv[1], needle = run_dir / "nope.yaml", "nope.yaml: config file not found"
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert needle in errors[0], errors[0]


def test_saved_vectors_are_used_when_present(run_dir, tmp_path):
    from dem_jax.config.loader import load_run_config
    from dem_jax.search.inputs import load_vectors
    from dem_jax.vectors import store as vector_store
    from dem_jax.vectors import vector as vectors_lib

    base = dem_jax.load_model(run_dir / "hf")
    layout = RunLayout(tmp_path)  # vectors only: no fine-tuned models in this run
    layout.vector("x").parent.mkdir(parents=True)
    expected = []
    for name in NAMES:
        ft = dem_jax.load_model(RunLayout(run_dir / "out").model(name))
        vector = vectors_lib.distribution_vector(base, ft, name=name)
        vector_store.save_vector(vector, layout.vector(name))
        expected.append(vector.params)
    run = load_run_config(run_dir / "run.yaml", [f"output_dir={tmp_path}"])
    loaded = load_vectors(run, NAMES, base, mesh=None)
    for got, want in zip(loaded, expected, strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)
