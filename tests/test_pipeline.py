"""`dem-jax pipeline` end to end on a miniature run: report content, export parity,
incremental re-runs and a kill mid-run."""

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_helpers import ROOT, cli_env, dem_jax_cmd, run_cli

TINY_DATA = ROOT / "configs" / "tiny"


def mini_config(out: Path, names=("reverse", "sort")) -> Path:
    """A seconds-scale pipeline config on the built-in synthetic data."""
    cfg = {
        "output_dir": str(out),
        "model": {
            "init": {
                "vocab_size": 55,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
            }
        },
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {
            "tokenizer": str(TINY_DATA / "tokenizer"),
            "seq_len": 32,
            "packing": False,
            "distributions": {
                n: {
                    "train": str(TINY_DATA / f"{n}.train.jsonl"),
                    "validation": str(TINY_DATA / f"{n}.val.jsonl"),
                }
                for n in names
            },
        },
        "train": {
            "steps": 12,
            "batch_size": 8,
            "learning_rate": 3.0e-3,
            "warmup_steps": 2,
            "compute_dtype": "float32",
            "eval_every": 0,
            "log_every": 4,
            "checkpoint_every": 4,
        },
        "search": {"strategy": "grid", "grid": [0.0, 0.5, 1.0], "batch_size": 8},
        "pipeline": {
            "pretrain": {"steps": 8, "batch_size": 8},
            "mixtures": ["uniform", "taskpgm"],
            "eval_max_examples": 8,
            "max_new_tokens": 6,
            "task_arithmetic_grid": [0.5, 1.0],
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    config = mini_config(out)
    done = run_cli("pipeline", config)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, config, done


def test_report_has_every_model_and_finite_numbers(finished_run):
    out, _, done = finished_run
    report = json.loads((out / "report" / "report.json").read_text())
    expected = {
        "base",
        "dem",
        "ft-reverse",
        "ft-sort",
        "mixture-uniform",
        "mixture-taskpgm",
        "uniform_soup",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "fisher",
        "regmean",
    }
    assert set(report["models"]) == expected
    for label, info in report["models"].items():
        for name in ("reverse", "sort"):
            ev = info["eval"][name]
            assert math.isfinite(ev["nll"]) and ev["ppl"] > 1 and ev["tokens"] > 0, label
            assert 0.0 <= ev["accuracy"] <= 1.0  # both have checkable answers
    for png in ("heatmap.png", "training_curves.png", "search.png"):
        assert (out / "report" / png).stat().st_size > 1000
    md = (out / "report" / "report.md").read_text()
    assert "| dem |" in md and "mixture-uniform" in md
    assert "mean log-ppl" in done.stdout  # the summary table is printed
    cost = report["cost"]
    assert cost["mixing_runs"] == 2 and cost["dem_total_flops"] > 0
    # The TaskPGM run trained with the proportions the mixture stage wrote.
    proportions = json.loads((out / "mixture" / "proportions.json").read_text())
    meta = json.loads((out / "models" / "mixture-taskpgm" / "dem_jax_model.json").read_text())
    assert meta["metadata"]["mixture"] == pytest.approx(proportions)


def _markdown_cells(md: str, label: str, section: str = "") -> list[str]:
    """The cells of the first Markdown table row that starts with ``label`` (after the
    heading ``section``)."""
    lines = md.split(section, 1)[1].splitlines() if section else md.splitlines()
    row = next(line for line in lines if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_report_is_a_page_to_forward(finished_run):
    import jax

    from dem_jax.config.loader import load_run_config

    out, _, _ = finished_run
    report = json.loads((out / "report" / "report.json").read_text())
    md = (out / "report" / "report.md").read_text()
    names = ("reverse", "sort")
    # The best value of each column is bold, and only it: here the lowest mean log-ppl.
    header = _markdown_cells(md, "model")
    col = header.index("mean log-ppl")
    means = {m: np.mean([i["eval"][n]["nll"] for n in names]) for m, i in report["models"].items()}
    best = min(means, key=means.get)
    assert _markdown_cells(md, best)[col] == f"**{means[best]:.4f}**"
    worst = max(means, key=means.get)
    assert "**" not in _markdown_cells(md, worst)[col]
    assert "mean log-ppl** is the mean, over the distributions" in md  # defined in the text
    # Every baseline's settings: the searched λ, densities, RegMean's α, the mixtures.
    settings = {m: i["settings"] for m, i in report["models"].items()}
    assert settings["task_arithmetic"]["lambda"] in (0.5, 1.0)
    assert settings["ties"]["density"] == settings["dare_linear"]["density"] == 0.5
    assert settings["regmean"]["alpha"] == 0.9 and "statistics" in settings["fisher"]
    taskpgm = json.loads((out / "mixture" / "proportions.json").read_text())
    assert settings["mixture-taskpgm"]["proportions"] == pytest.approx(taskpgm, abs=1e-4)
    lam = settings["task_arithmetic"]["lambda"]
    models = "## Models and their settings"
    assert f"lambda={lam}" in _markdown_cells(md, "task_arithmetic", models)[2]
    assert "density=0.5" in _markdown_cells(md, "ties", models)[2]
    assert "alpha=0.9" in _markdown_cells(md, "regmean", models)[2]
    # Like with like: DEM against a search over mixture proportions at the same
    # resolution (a 3-point grid per ω -> step 1/2 on the 2-simplex: 3 mixtures).
    search = report["cost"]["mixing_search"]
    assert search["runs"] == 3 and search["measured_on"] == "mixture-uniform"
    per_run = report["cost"]["items"]["data mixing mixture-uniform"]
    assert search["total_flops"] == pytest.approx(3 * per_run["total_flops"])
    assert per_run["wall_s"] > 0 and search["total_wall_s"] == pytest.approx(3 * per_run["wall_s"])
    assert search["assumption"] in md and "C(2+2-1, 2-1) = 3 runs" in search["assumption"]
    row = _markdown_cells(
        md,
        "data mixing, searching its proportions at DEM's resolution (3 runs like mixture-uniform)",
    )
    assert row[1] == "3" and row[3] == f"{search['total_flops']:.3g}"
    assert _markdown_cells(md, "DEM: 2 fine-tunes + weight search (9 candidates)")[1] == "2"
    # Wall time per stage, versions, seeds, the config (which loads as a run config).
    stages = report["stage_wall_s"]
    assert list(stages)[:3] == ["base model", "fine-tunes", "distribution vectors"]
    assert all(s >= 0 for s in stages.values()) and "evaluation" in stages
    assert _markdown_cells(md, "fine-tunes")[1] == f"{stages['fine-tunes']:,.1f} s"
    assert f"jax {jax.__version__}" in md and "dem-jax 0.1.0" in md
    assert "train.seed (initialisation) = 0" in md
    assert load_run_config(out / "report" / "config.yaml").search.grid == [0.0, 0.5, 1.0]
    # The search as a person reads it: the best candidates, chosen first.
    top = report["dem"]["top_candidates"]
    assert top[0]["omega"] == report["dem"]["omega"] and len(top) == 9
    assert "![search objective against each ω](search.png)" in md


def test_a_user_can_follow_every_stage(finished_run):
    out, _, done = finished_run
    err = done.stderr
    stages = [line for line in err.splitlines() if line.startswith("stage ")]
    assert [s.split(":")[0] for s in stages] == [f"stage {k}/10" for k in range(1, 11)]
    assert stages[0].startswith("stage 1/10: base model") and stages[-1].startswith(
        "stage 10/10: report"
    )
    for run in ("base", "reverse", "sort", "mixture-uniform"):
        line = next(x for x in err.splitlines() if x.startswith(f"[{run}] done: "))
        assert "tokens/s" in line and "FLOP/s" in line and " s (first step" in line
        assert f"tensorboard --logdir {out / 'tensorboard' / run}" in line
        assert list((out / "tensorboard" / run).glob("events.out.tfevents*"))
    summary = json.loads((out / "models" / "sort" / "dem_jax_model.json").read_text())["metadata"]
    assert summary["train_summary"]["steps_run"] == 12 and summary["train_summary"]["wall_s"] > 0
    assert summary["train_summary"]["tokens_per_s"] > 0


def test_the_directory_named_base_is_the_base(finished_run, tmp_path, capsys):
    """models/base is the pretrained base the fine-tunes start from (the random init is
    models/init), and `dem-jax vectors` warns when --base is not a fine-tune's base."""
    import dem_jax
    from dem_jax.vectors.vector import distribution_vector

    out, _, _ = finished_run
    models = out / "models"
    assert not (models / "pretrain").exists()
    meta = lambda name: json.loads((models / name / "dem_jax_model.json").read_text())["metadata"]  # noqa: E731
    assert meta("base")["trained_on"] == ["reverse", "sort"]
    assert "trained_on" not in meta("init")
    assert meta("base")["base"] == str(models / "init")
    for name in ("reverse", "sort", "mixture-uniform"):
        assert meta(name)["base"] == str(models / "base")
        assert meta(name)["base_relative"] == "../base"

    wrong = run_cli(
        "vectors",
        "--base",
        models / "init",
        "--model",
        f"sort={models / 'sort'}",
        "--out",
        tmp_path / "wrong",
    )
    assert wrong.returncode == 0, wrong.stderr[-3000:]
    warnings = [line for line in wrong.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: sort was fine-tuned from {models / 'base'}, not from the base given "
        f"({models / 'init'}); its vector is measured from a model it was not trained from"
    ]
    # The right base, also after the whole run directory moved: no warning.
    moved = tmp_path / "moved"
    shutil.copytree(models / "base", moved / "base")
    shutil.copytree(models / "sort", moved / "sort")
    for base in (models / "base", moved / "base"):
        capsys.readouterr()
        ft = moved / "sort" if base.parent == moved else models / "sort"
        distribution_vector(
            dem_jax.load_model(base), dem_jax.load_model(ft), base_path=base, model_path=ft
        )
        assert "warning" not in capsys.readouterr().err


def test_dem_weights_are_the_search_argmin(finished_run):
    out, _, _ = finished_run
    report = json.loads((out / "report" / "report.json").read_text())
    table = json.loads((out / "search" / "candidates.json").read_text())
    best = min(table["candidates"], key=lambda c: c["objective"])
    assert report["dem"]["omega"] == best["omega"]
    assert len(table["candidates"]) == 9  # the 3 x 3 grid
    # The DEM model's own evaluation reproduces the search's objective.
    dem_eval = report["models"]["dem"]["eval"]
    mean_nll = np.mean([dem_eval[n]["nll"] for n in ("reverse", "sort")])
    assert mean_nll == pytest.approx(best["objective"], rel=1e-4)


def test_exported_model_matches_in_transformers(finished_run):
    import torch
    import transformers

    from dem_jax.data.batches import encode_records
    from dem_jax.data.records import read_jsonl
    from dem_jax.data.tokenize import load_tokenizer

    out, _, _ = finished_run
    report = json.loads((out / "report" / "report.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "models" / "dem-hf").eval()
    tok = load_tokenizer(TINY_DATA / "tokenizer")
    rows = encode_records(read_jsonl(TINY_DATA / "sort.val.jsonl"), tok, 32, False).rows
    total, count = 0.0, 0.0
    with torch.no_grad():
        for r in rows:
            n = int((r["segment_ids"] > 0).sum())
            logits = hf(torch.tensor(r["tokens"][None, :n], dtype=torch.long)).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            nll = -logp[torch.arange(n), torch.tensor(r["targets"][:n], dtype=torch.long)]
            mask = torch.tensor(r["loss_mask"][:n], dtype=torch.float64)
            total += float((nll * mask).sum())
            count += float(mask.sum())
    assert report["models"]["dem"]["eval"]["sort"]["tokens"] == count
    assert total / count == pytest.approx(report["models"]["dem"]["eval"]["sort"]["nll"], rel=1e-4)


def test_adding_a_distribution_trains_only_it_even_when_killed(finished_run, tmp_path):
    out, _, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    config = mini_config(copy, names=("reverse", "sort", "arithmetic"))
    sort_log = (copy / "logs" / "sort.jsonl").read_text()

    # Start the re-run, kill it once the new fine-tune and its vector are written
    # (the search is in flight), then run it again to completion.
    proc = subprocess.Popen(
        dem_jax_cmd("pipeline", config),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while not (copy / "vectors" / "arithmetic").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, first_err = proc.communicate()
    assert "[sort] already trained" in first_err and "[reverse] already trained" in first_err
    assert "[reverse] train " not in first_err and "[sort] train " not in first_err

    done = run_cli("pipeline", config)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[arithmetic] already trained" in done.stderr  # not redone after the kill
    assert "[arithmetic] train " not in done.stderr
    assert (copy / "logs" / "sort.jsonl").read_text() == sort_log
    report = json.loads((copy / "report" / "report.json").read_text())
    assert report["distributions"] == ["arithmetic", "reverse", "sort"]
    assert set(report["dem"]["omega"]) == {"arithmetic", "reverse", "sort"}
    mixture = json.loads((copy / "models" / "mixture-uniform" / "dem_jax_model.json").read_text())[
        "metadata"
    ]["trained_on"]
    assert mixture == ["arithmetic", "reverse", "sort"]  # data mixing had to retrain
    proportions = json.loads((copy / "mixture" / "proportions.json").read_text())
    assert set(proportions) == {"arithmetic", "reverse", "sort"}  # TaskPGM recomputed
    assert not list(copy.rglob("*.tmp-*"))  # no half-written outputs left behind
