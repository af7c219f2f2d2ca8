"""The pipeline report: Markdown + JSON, with PNG plots (matplotlib, if installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dem_jax.io import storage
from dem_jax.io.figures import pyplot, save_figure
from dem_jax.sharding.distributed import is_main_process


def mean_log_ppl(evals: dict[str, dict[str, Any]], names: list[str]) -> float:
    """The search objective: mean over distributions of log-perplexity (= mean NLL)."""
    return sum(evals[n]["nll"] for n in names) / len(names)


def mean_accuracy(evals: dict[str, dict[str, Any]], names: list[str]) -> float | None:
    """Mean exact-match accuracy over the distributions that have answers."""
    accs = [evals[n]["accuracy"] for n in names if "accuracy" in evals[n]]
    return sum(accs) / len(accs) if accs else None


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """Header + one row per model: perplexity (and accuracy) per distribution."""
    names = result["distributions"]
    answered = [
        n for n in names if any("accuracy" in m["eval"][n] for m in result["models"].values())
    ]
    header = [
        "model",
        *[f"ppl {n}" for n in names],
        *[f"acc {n}" for n in answered],
        "mean log-ppl",
        "mean acc",
    ]
    rows = [header]
    for model, info in result["models"].items():
        ev = info["eval"]
        acc = mean_accuracy(ev, names)
        rows.append(
            [
                model,
                *[f"{ev[n]['ppl']:.3f}" for n in names],
                *[f"{ev[n]['accuracy']:.2f}" if "accuracy" in ev[n] else "-" for n in answered],
                f"{mean_log_ppl(ev, names):.4f}",
                "-" if acc is None else f"{acc:.3f}",
            ]
        )
    return rows


def format_table(rows: list[list[str]], markdown: bool = False) -> str:
    """Rows as an aligned terminal table or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(row: list[str]) -> str:  # model name left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(rows[0]), "-" * len(fmt(rows[0])), *[fmt(r) for r in rows[1:]]])


def _markdown(result: dict[str, Any], plots: list[str]) -> str:
    cost = result["cost"]
    dem = result["dem"]
    lines = [
        "# dem-jax report",
        "",
        f"Distributions: {', '.join(result['distributions'])}. Validation perplexity "
        "(lower is better) and greedy exact-match accuracy (higher is better) on each "
        "distribution's held-out records.",
        "",
        format_table(summary_rows(result), markdown=True),
        "",
        "## DEM weights",
        "",
        f"Search: `{dem['strategy']}`, objective `{dem['objective']}` = "
        f"{dem['objective_value']:.4f}, {dem['candidates_tried']} candidates.",
        "",
        "| distribution | ω |",
        "|---|---|",
        *[f"| {n} | {json.dumps(w)} |" for n, w in dem["omega"].items()],
        "",
        "## Cost",
        "",
        "| what | tokens trained | training FLOPs | search FLOPs | total FLOPs |",
        "|---|---|---|---|---|",
    ]
    for key, c in cost["items"].items():
        lines.append(
            f"| {key} | {c['tokens']:,} | {c['train_flops']:.3g} | "
            f"{c.get('search_flops', 0):.3g} | {c['total_flops']:.3g} |"
        )
    lines += [
        "",
        f"DEM (fine-tunes + search): {cost['dem_total_flops']:.3g} FLOPs. Data mixing: "
        f"{cost['mixing_per_run_flops']:.3g} FLOPs per mixture tried, "
        f"{cost['mixing_total_flops']:.3g} for the {cost['mixing_runs']} tried here. "
        "Adding a distribution costs DEM one fine-tune plus a search; data mixing "
        "retrains every mixture.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", f"Wall time: {result['wall_time_s']:.0f} s.", ""]
    return "\n".join(lines)


def _plots(result: dict[str, Any], out: Path, root: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    names, models = result["distributions"], list(result["models"])
    made = []
    values = [[result["models"][m]["eval"][n]["nll"] for n in names] for m in models]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.0 + 0.42 * len(models)))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(models)), models)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{math.exp(v):.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_title("validation perplexity (colour: log scale)")
    fig.colorbar(im, ax=ax, label="NLL")
    fig.tight_layout()
    save_figure(fig, out / "heatmap.png", dpi=120)
    made.append("heatmap.png")

    curves = sorted((root / "logs").glob("*.jsonl"))
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for path in curves:
            points = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            train = [(p["step"], p["loss"]) for p in points if p.get("kind") == "train"]
            if train:
                ax.plot(*zip(*train, strict=True), label=path.stem)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (NLL)")
        ax.legend(fontsize=7)
        ax.set_title("training curves")
        fig.tight_layout()
        save_figure(fig, out / "training_curves.png", dpi=120)
        made.append("training_curves.png")
    search_png = root / "search" / "search.png"
    if search_png.exists():
        storage.copy_file(search_png, out / "search.png")
        made.append("search.png")
    return made


def write_report(result: dict[str, Any], out: Path, root: Path) -> Path:
    """report.md, report.json and plots in ``out``; returns the Markdown path.
    Only process 0 writes."""
    path = out / "report.md"
    if not is_main_process():
        return path
    storage.makedirs(out)
    plots = _plots(result, out, root)
    (out / "report.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    path.write_text(_markdown(result, plots))
    return path
