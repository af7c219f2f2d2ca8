"""The pipeline report: ``report.md`` (a page to forward: results with the best of
each column in bold, DEM's weights and search, every baseline's settings, the cost
of DEM against data mixing like with like, training curves, wall time per stage,
versions, seeds and the config), ``report.json`` (the same numbers), ``config.yaml``
and PNG plots (:mod:`dem_jax.pipeline.report_plots`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dem_jax.io import storage
from dem_jax.pipeline.report_plots import report_plots
from dem_jax.sharding.distributed import is_main_process

MEAN_LOG_PPL = (
    "**mean log-ppl** is the mean, over the distributions, of each one's log-perplexity "
    "on its own held-out split: (1/N) Σ_i log ppl_i, where log ppl_i is the mean negative "
    "log-likelihood in nats per loss token of distribution i (lower is better). It is the "
    "objective DEM's weight search minimises (`mean_log_ppl`)."
)


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


def _higher_is_better(header: str) -> bool:
    return header.startswith("acc ") or header == "mean acc"


def bold_best(rows: list[list[str]]) -> list[list[str]]:
    """``rows`` (header first) with the best value of every numeric column in bold
    (lowest perplexity and log-ppl, highest accuracy; every tie at the shown precision,
    none when the whole column ties)."""
    out = [list(r) for r in rows]
    for j, header in enumerate(rows[0][1:], start=1):
        values = {}
        for i, row in enumerate(rows[1:], start=1):
            try:
                values[i] = float(row[j])
            except ValueError:  # "-": not applicable
                continue
        if len(set(values.values())) < 2:
            continue
        best = (max if _higher_is_better(header) else min)(values.values())
        for i, v in values.items():
            if v == best:
                out[i][j] = f"**{rows[i][j]}**"
    return out


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


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} s"


def _settings_text(settings: dict[str, Any]) -> str:
    """``key=value; ...`` for a table cell (``|`` escaped)."""
    parts = []
    for k, v in settings.items():
        value = json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)
        parts.append(f"{k}={value}")
    return "; ".join(parts).replace("|", "\\|") or "-"


def _omega_text(w: Any) -> str:
    if isinstance(w, dict):  # per layer
        return f"per layer (mean {sum(w['layers']) / max(len(w['layers']), 1):.3g})"
    return f"{w:g}"


def _results_section(result: dict[str, Any]) -> list[str]:
    names = result["distributions"]
    return [
        "## Results",
        "",
        f"Every model scored on the held-out records of each distribution ({', '.join(names)}):"
        " `ppl NAME` is the perplexity exp(mean NLL) (lower is better), `acc NAME` the "
        "greedy exact-match accuracy of the answers (higher is better). "
        + MEAN_LOG_PPL
        + " **Bold**: the best value of its column.",
        "",
        format_table(bold_best(summary_rows(result)), markdown=True),
        "",
        "![validation perplexity of every model on every distribution](heatmap.png)",
        "",
    ]


def _search_section(result: dict[str, Any], plots: list[str]) -> list[str]:
    dem = result["dem"]
    names = result["distributions"]
    settings = result["models"]["dem"]["settings"]
    lines = [
        "## DEM weights and the search",
        "",
        f"DEM = base + Σ_i ω_i (fine-tune_i − base), ω chosen by the `{dem['strategy']}` search "
        f"({_settings_text(settings)}): {dem['candidates_tried']} candidates, each scored by "
        f"forward passes over every validation set; the best, `{dem['objective']}` = "
        f"{dem['objective_value']:.4f}, is the DEM model.",
        "",
        "| distribution | ω |",
        "|---|---|",
        *[f"| {n} | {_omega_text(w)} |" for n, w in dem["omega"].items()],
        "",
    ]
    top = dem.get("top_candidates") or []
    if top:
        header = ["rank", *[f"ω {n}" for n in names], *[f"log-ppl {n}" for n in names]]
        lines += [
            f"The {len(top)} best candidates (the first is the one chosen; log-ppl = mean NLL):",
            "",
            "| " + " | ".join([*header, "objective"]) + " |",
            "|" + "---|" * (len(header) + 1),
        ]
        for rank, c in enumerate(top, start=1):
            cells = [str(rank), *[_omega_text(c["omega"].get(n)) for n in names]]
            cells += [_num(c["mean_nll"].get(n), ".4f") for n in names]
            lines.append("| " + " | ".join([*cells, f"{c['objective']:.4f}"]) + " |")
        lines.append("")
    if "search.png" in plots:
        lines += [
            "![search objective against each ω](search.png)",
            "",
            "One panel per distribution: every candidate's objective (grey) against its ω_i, "
            "the best objective reached at each value of ω_i over the other weights (black "
            "line), and the chosen candidate (red star).",
            "",
        ]
    return lines


def _settings_section(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Models and their settings",
        "",
        "| model | kind | settings | path |",
        "|---|---|---|---|",
    ]
    for label, info in result["models"].items():
        lines.append(
            f"| {label} | {info['kind']} | {_settings_text(info.get('settings', {}))} | "
            f"`{info['path']}` |"
        )
    return [*lines, ""]


def _cost_section(result: dict[str, Any]) -> list[str]:
    cost = result["cost"]
    search = cost["mixing_search"]
    n = len(result["distributions"])
    lines = [
        "## Cost: DEM against data mixing, like with like",
        "",
        "FLOPs are matmul FLOPs of the model as implemented (a training step = forward + "
        "backward = 3 forward passes; a search candidate = one forward pass over every "
        "validation set). Wall times are measured (compilation included) on "
        f"{result['environment']['devices']}.",
        "",
        "| what | tokens trained | training FLOPs | search FLOPs | total FLOPs | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in cost["items"].items():
        lines.append(
            f"| {key} | {c['tokens']:,} | {c['train_flops']:.3g} | "
            f"{c.get('search_flops', 0):.3g} | {c['total_flops']:.3g} | "
            f"{_seconds(c.get('wall_s'))} |"
        )
    measured = search["measured_on"] or "an estimated mixture run (none was trained)"
    lines += [
        "",
        "| approach | training runs | tokens trained | FLOPs | wall time |",
        "|---|---|---|---|---|",
        f"| DEM: {n} fine-tunes + weight search ({result['dem']['candidates_tried']} candidates)"
        f" | {n} | {cost['dem_tokens']:,} | {cost['dem_total_flops']:.3g} | "
        f"{_seconds(cost['dem_wall_s'])} |",
        f"| data mixing, searching its proportions at DEM's resolution ({search['runs']} runs "
        f"like {measured}) | {search['runs']} | {search['total_tokens']:,} | "
        f"{search['total_flops']:.3g} | {_seconds(search['total_wall_s'])} |",
    ]
    if cost["mixing_runs"]:
        lines.append(
            f"| data mixing, the {cost['mixing_runs']} mixtures trained here | "
            f"{cost['mixing_runs']} | {cost['mixing_total_tokens']:,} | "
            f"{cost['mixing_total_flops']:.3g} | {_seconds(cost['mixing_wall_s'])} |"
        )
    ratio = search["total_flops"] / cost["dem_total_flops"] if cost["dem_total_flops"] else 0
    lines += [
        "",
        search["assumption"]
        + f" At that resolution data mixing costs {ratio:.3g}× DEM's FLOPs. The pretraining "
        "of the shared base, if any, is counted for neither. Adding a distribution costs DEM "
        "one fine-tune and a new search (the other fine-tunes and vectors are reused); data "
        "mixing retrains every mixture, on a larger grid.",
        "",
    ]
    return lines


def _curves_section(result: dict[str, Any], plots: list[str]) -> list[str]:
    if "training_curves.png" not in plots:
        return []
    return [
        "## Training curves",
        "",
        "![training loss and validation NLL per run](training_curves.png)",
        "",
        "One panel per training run: the training loss at every logged step (line) and the "
        "validation NLL of the run's own distributions (points; a fine-tune's own "
        "distribution, every distribution for the base and the mixtures). The same curves are"
        " in `logs/NAME.jsonl` and, for TensorBoard, in `tensorboard/NAME` under the run's "
        "output directory (`tensorboard --logdir tensorboard`).",
        "",
    ]


def _run_section(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    lines = [
        "## Run",
        "",
        "| stage | wall time |",
        "|---|---|",
        *[f"| {name} | {_seconds(s)} |" for name, s in result["stage_wall_s"].items()],
        f"| **total** | {_seconds(result['wall_time_s'])} |",
        "",
        "A stage completed by an earlier run takes about 0 s here; each training run's own "
        "wall time is in the cost table.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ". "
        f"Backend: {env['backend']}, {env['devices']}, {env['processes']} process(es).",
        "",
        "Seeds: " + ", ".join(f"{k} = {v}" for k, v in env["seeds"].items()) + ".",
        "",
        *(
            [f"Hugging Face export of the DEM model: `{result['hf_export']}`.", ""]
            if result.get("hf_export")
            else []
        ),
        "Config ([config.yaml](config.yaml), with every default filled in; rerun with "
        "`dem-jax pipeline config.yaml`):",
        "",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        _config_yaml(result).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return lines


def _config_yaml(result: dict[str, Any]) -> str:
    return yaml.safe_dump(json.loads(json.dumps(result["config"], default=str)), sort_keys=False)


def _markdown(result: dict[str, Any], plots: list[str]) -> str:
    names = result["distributions"]
    intro = [
        "# dem-jax report",
        "",
        f"DEM (Distribution Edited Model, Ram et al., EMNLP 2024) over {len(names)} "
        f"distributions: the base (`{result['models']['base']['path']}`) fine-tuned once per "
        "distribution, the distribution vectors (fine-tune − base) added to the base with "
        "weights ω chosen by validation perplexity, against data mixing (one training run on "
        "a mixture of all distributions) and other merges of the same fine-tunes.",
        "",
    ]
    return "\n".join(
        intro
        + _results_section(result)
        + _search_section(result, plots)
        + _settings_section(result)
        + _cost_section(result)
        + _curves_section(result, plots)
        + _run_section(result)
    )


def write_report(result: dict[str, Any], out: Path, root: Path) -> Path:
    """report.md, report.json, config.yaml and plots in ``out``; returns the Markdown
    path. Only process 0 writes."""
    path = out / "report.md"
    if not is_main_process():
        return path
    storage.makedirs(out)
    plots = report_plots(result, out, root)
    storage.write_text(out / "config.yaml", _config_yaml(result))
    storage.write_text(out / "report.json", json.dumps(result, indent=2, default=float) + "\n")
    storage.write_text(path, _markdown(result, plots))
    return path
