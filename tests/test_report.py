"""The report's pieces without a pipeline run: bold best values, the like-with-like
cost of a data-mixing search, stage lines, training summaries, and the run layout
that keeps ``models/base`` the real base."""

import json
import math

import pytest
from train_helpers import TINY_MODEL, tiny_config

import dem_jax
from dem_jax.errors import DemError
from dem_jax.io.run_layout import RunLayout, check_run_paths
from dem_jax.pipeline.costs import cost_summary, mixing_search_size
from dem_jax.pipeline.report import bold_best
from dem_jax.pipeline.run import _adopt_legacy_base
from dem_jax.pipeline.stages import StageLog, stage_names
from dem_jax.train.progress import format_summary, training_summary


def test_bold_marks_the_best_of_each_column_and_nothing_in_a_tie():
    rows = [
        ["model", "ppl a", "acc a", "mean log-ppl", "mean acc"],
        ["x", "3.000", "0.50", "1.2000", "-"],
        ["y", "2.000", "0.25", "1.2000", "0.300"],
        ["z", "2.000", "0.00", "1.2000", "0.100"],
    ]
    got = bold_best(rows)
    assert [r[1] for r in got[1:]] == ["3.000", "**2.000**", "**2.000**"]  # lowest, ties too
    assert [r[2] for r in got[1:]] == ["**0.50**", "0.25", "0.00"]  # highest accuracy
    assert [r[3] for r in got[1:]] == ["1.2000"] * 3  # the whole column ties: no bold
    assert [r[4] for r in got[1:]] == ["-", "**0.300**", "0.100"]
    assert got[0] == rows[0]


def _table(strategy, omegas, names=("a", "b", "c", "d")):
    return {
        "distributions": list(names),
        "strategy": strategy,
        "candidates": [
            {"index": i, "omega": dict(zip(names, w, strict=True)), "objective": float(i)}
            for i, w in enumerate(omegas)
        ],
    }


def test_a_mixing_search_at_the_grid_step_of_dem_is_the_simplex_grid():
    import itertools

    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    runs, assumption = mixing_search_size(_table("grid", itertools.product(grid, repeat=4)))
    # Proportions in quarters over 4 distributions: compositions of 4 into 4 parts.
    quarters = [w for w in itertools.product(range(5), repeat=4) if sum(w) == 4]
    assert runs == len(quarters) == math.comb(7, 3) == 35
    assert "step 0.25" in assumption and "C(4+4-1, 4-1) = 35 runs" in assumption
    two = itertools.product([0.0, 0.3, 0.6], repeat=2)
    runs, _ = mixing_search_size(_table("grid", two, names=("a", "b")))
    assert runs == math.comb(4 + 1, 1)  # step 0.3: proportions in fifths (rounded up)


def test_other_searches_count_the_distinct_weightings_they_scored():
    omegas = [(0.2, 0.2, 0.2, 0.4), (0.1, 0.1, 0.1, 0.2), (0.5, 0.5, 0.0, 0.0), (0, 0, 0, 0)]
    runs, assumption = mixing_search_size(_table("random", omegas))
    assert runs == 2  # the first two are one mixture; all-zero is no mixture
    assert "distinct weighting" in assumption
    per_layer = {"layers": [0.1, 0.2], "other": 0.3}
    table = _table("gradient", [(per_layer,) * 4] * 3)
    assert mixing_search_size(table)[0] == 3


def test_cost_summary_compares_dem_with_mixing_runs_and_search():
    item = lambda flops, wall: {  # noqa: E731
        "tokens": 10,
        "train_flops": flops,
        "total_flops": flops,
        "wall_s": wall,
    }
    items = {
        "pretrain (shared base)": item(100.0, 1.0),
        "fine-tune a": item(5.0, 2.0),
        "fine-tune b": item(5.0, 2.0),
        "weight search": {**item(0.0, 1.0), "total_flops": 3.0, "tokens": 0},
        "data mixing mixture-uniform": item(10.0, 4.0),
    }
    table = _table("grid", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)], names=("a", "b"))
    cost = cost_summary(items, table, ["mixture-uniform"], item(0.0, None))
    assert cost["dem_total_flops"] == 13.0 and cost["dem_wall_s"] == 5.0  # no pretraining
    assert cost["dem_tokens"] == 20
    search = cost["mixing_search"]
    assert search["runs"] == 2 and search["total_flops"] == 20.0 and search["total_wall_s"] == 8.0
    assert cost["mixing_runs"] == 1 and cost["mixing_total_flops"] == 10.0


def test_stage_lines_number_every_stage(tmp_path):
    cfg = tiny_config(tmp_path, "pipeline.mixtures=[uniform,taskpgm]", "pipeline.export_hf=false")
    names = stage_names(cfg)
    assert names[0] == "base model" and names[-1] == "report"
    assert "TaskPGM proportions" in names and "Hugging Face export" not in names
    lines = []
    stages = StageLog(names, lines.append)
    with stages.run("fine-tunes", "a, b"):
        pass
    assert lines == [f"stage 2/{len(names)}: fine-tunes (a, b)"]
    assert stages.wall_s["fine-tunes"] >= 0


def test_training_summary_leaves_compilation_out_of_the_speed():
    s = training_summary(11, 100, 1e9, wall_s=12.0, first_step_s=6.0, loop_s=11.0)
    assert s["tokens"] == 1100 and s["flops"] == 11e9
    assert s["tokens_per_s"] == pytest.approx(10 * 100 / 5.0)
    assert s["flops_per_s"] == pytest.approx(10 * 1e9 / 5.0)
    line = format_summary("sort", s, "logs/sort.jsonl", "tb/sort")
    assert line.startswith("[sort] done: 11 steps in 12.0 s (first step with compilation 6.0 s)")
    assert "200 tokens/s, 2 GFLOP/s" in line and "tensorboard --logdir tb/sort" in line


def test_a_distribution_may_not_take_a_directory_the_run_names(tmp_path):
    cfg = tiny_config(tmp_path)
    data = cfg.data.distributions
    cfg.data.distributions = {"base": next(iter(data.values()))}
    with pytest.raises(DemError, match="'base' names a directory the run writes itself"):
        check_run_paths(cfg)


def test_an_older_runs_pretrained_base_becomes_models_base(tmp_path):
    layout = RunLayout(tmp_path)
    init = dem_jax.init_model(TINY_MODEL, seed=0)
    pretrained = dem_jax.init_model(TINY_MODEL, seed=1)
    pretrained.metadata = {"trained_on": ["a"], "steps": 3}
    layout.model("base").parent.mkdir()
    dem_jax.save_model(init, layout.model("base"))  # as dem-jax 0.1.0 left them
    dem_jax.save_model(pretrained, layout.model("pretrain"))
    layout.metrics("pretrain").parent.mkdir()
    layout.metrics("pretrain").write_text('{"step": 1}\n')
    logged = []
    _adopt_legacy_base(layout, logged.append)
    meta = lambda p: json.loads((p / "dem_jax_model.json").read_text())["metadata"]  # noqa: E731
    assert meta(layout.base_model)["trained_on"] == ["a"]
    assert "trained_on" not in meta(layout.init_model)
    assert not layout.model("pretrain").exists() and layout.metrics("base").exists()
    assert len(logged) == 1
    _adopt_legacy_base(layout, logged.append)  # nothing left to do
    assert len(logged) == 1


def test_a_random_init_at_models_base_makes_way_for_pretraining(tmp_path):
    layout = RunLayout(tmp_path)
    layout.base_model.parent.mkdir()
    dem_jax.save_model(dem_jax.init_model(TINY_MODEL, seed=0), layout.base_model)
    logged = []
    _adopt_legacy_base(layout, logged.append)
    assert not layout.base_model.exists() and layout.init_model.exists()
    assert logged == [
        f"[base] {layout.base_model} was a random initialisation: moved to {layout.init_model}"
    ]
