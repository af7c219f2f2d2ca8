"""What the pipeline's report is made of: every model's evaluation and settings, DEM's
weights and search, the costs, the config, the seeds and the software versions (the
``report.json`` dict; :mod:`dem_jax.pipeline.report` renders it)."""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata
from typing import Any

import jax

from dem_jax.config.run import RunConfig
from dem_jax.pipeline.baselines import FISHER_MERGES

TOP_CANDIDATES = 10  # rows of the report's table of the best search candidates


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(cfg: RunConfig) -> dict[str, Any]:
    """Software versions, devices and seeds: what someone needs to rerun the numbers."""
    devices = jax.devices()
    return {
        "versions": {
            "dem-jax": package_version("dem-jax"),
            "jax": jax.__version__,
            "jaxlib": package_version("jaxlib"),
            "flax": package_version("flax"),
            "optax": package_version("optax"),
            "python": platform.python_version(),
        },
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "processes": jax.process_count(),
        "seeds": {
            "train.seed (initialisation)": cfg.train.seed,
            "data.shuffle_seed (data order)": cfg.data.shuffle_seed,
            "search.seed (random and bayes search)": cfg.search.seed,
            "pipeline.seed (DARE's drop)": cfg.pipeline.seed,
        },
    }


def _search_settings(cfg: RunConfig) -> dict[str, Any]:
    s = cfg.search
    fields = {
        "grid": ("grid",),
        "random": ("samples", "concentration", "scale", "seed"),
        "bayes": ("grid", "samples", "seed", "per_layer"),  # grid: the box searched
        "gradient": ("steps", "learning_rate", "init", "per_layer"),
    }.get(s.strategy)
    chosen = dataclasses.asdict(s) if fields is None else {k: getattr(s, k) for k in fields}
    return {"strategy": s.strategy, "objective": s.objective, **chosen}


def model_settings(
    cfg: RunConfig, label: str, kind: str, info: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """How model ``label`` was made: its method's parameters as this run set them.

    ``info`` is what its stage recorded (task arithmetic's chosen λ), ``meta`` its
    saved model metadata (a mixture's proportions)."""
    p, t = cfg.pipeline, cfg.train
    names = sorted(cfg.data.distributions)
    stats = {
        "statistics": f"first {p.eval_max_examples} validation records of each distribution",
        "batch_size": cfg.search.batch_size,
    }
    if kind == "base":
        if cfg.model.path is not None:
            return {"path": cfg.model.path}
        if p.pretrain.steps > 0:
            pre = p.pretrain
            return {
                "pretrained": f"{pre.steps} steps on a uniform mixture of "
                + ", ".join(sorted(pre.distributions or names)),
                "learning_rate": pre.learning_rate,
                "batch_size": pre.batch_size,
                "from": "random initialisation (models/init)",
            }
        return {"from": "random initialisation", "seed": t.seed}
    if kind == "dem":
        return _search_settings(cfg)
    if kind == "fine-tune":
        return {"steps": t.steps, "batch_size": t.batch_size, "learning_rate": t.learning_rate}
    if kind == "data mixing":
        steps = p.mixture_steps or t.steps * len(names)
        out: dict[str, Any] = {"steps": steps, "batch_size": t.batch_size}
        if meta.get("mixture"):
            out["proportions"] = {n: round(w, 4) for n, w in meta["mixture"].items()}
        if label == "mixture-taskpgm":
            tp = p.taskpgm
            out.update(similarity=tp.similarity, lam=tp.lam, beta=tp.beta, method=tp.method)
        return out
    if label == "uniform_soup":
        return {"method": "linear", "weight": f"1/{len(names)} each (mean of the fine-tunes)"}
    if label == "task_arithmetic":
        return {
            "lambda": info.get("lambda"),
            "lambda_grid": p.task_arithmetic_grid,
            "chosen_by": f"the search objective ({cfg.search.objective}) on validation",
        }
    if label == "ties":
        return {"density": p.density, "weight": 1.0, "sign_consensus": "sum", "normalize": True}
    if label == "dare_linear":
        return {"density": p.density, "weight": 1.0, "rescale": "1/density", "seed": p.seed}
    if label == "fisher":
        return {"fisher": "diagonal, of each fine-tune on its own distribution", **stats}
    if label == "regmean":
        return {"alpha": p.regmean_alpha, "statistics_of": "linear layers' input Grams", **stats}
    return dict(info)


def top_candidates(table: dict[str, Any], k: int = TOP_CANDIDATES) -> list[dict[str, Any]]:
    """The ``k`` best search candidates (lowest objective first)."""
    ranked = sorted(table["candidates"], key=lambda c: c["objective"])[:k]
    return [
        {
            "index": c["index"],
            "omega": c["omega"],
            "objective": c["objective"],
            "mean_nll": {n: s.get("mean_nll") for n, s in c.get("scores", {}).items()},
        }
        for c in ranked
    ]


def build_result(
    cfg: RunConfig,
    names: list[str],
    models: dict[str, Any],
    evals: dict[str, Any],
    chosen: dict[str, Any],
    table: dict[str, Any],
    infos: dict[str, dict[str, Any]],
    metas: dict[str, dict[str, Any]],
    cost: dict[str, Any],
    stage_wall_s: dict[str, float],
    wall: float,
    hf_dir,
) -> dict[str, Any]:
    """The report's content, as ``report.json`` holds it."""
    kinds = {"base": "base", "dem": "dem"}
    kinds.update({f"ft-{n}": "fine-tune" for n in names})
    kinds.update({m: "data mixing" for m in models if m.startswith("mixture-")})
    kinds.update({b: "merge baseline" if b in FISHER_MERGES else "vector baseline" for b in infos})
    return {
        "distributions": names,
        "models": {
            label: {
                "kind": kinds[label],
                "path": str(path),
                "eval": evals[label],
                "settings": model_settings(
                    cfg, label, kinds[label], infos.get(label, {}), metas.get(label, {})
                ),
                **({"stage_info": infos[label]} if infos.get(label) else {}),
            }
            for label, path in models.items()
        },
        "dem": {
            "omega": chosen["omega"],
            "strategy": chosen["strategy"],
            "objective": chosen["objective"],
            "objective_value": chosen["objective_value"],
            "candidates_tried": chosen["candidates_tried"],
            "top_candidates": top_candidates(table),
        },
        "cost": cost,
        "stage_wall_s": stage_wall_s,
        "environment": environment(cfg),
        "config": dataclasses.asdict(cfg),
        "hf_export": None if hf_dir is None else str(hf_dir),
        "wall_time_s": wall,
    }
