"""The pipeline's stages, in order, each skipped when already complete and valid."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dem_jax.config.run import BaseModelConfig, RunConfig
from dem_jax.data.pipeline import distribution_records, read_proportions
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.io import storage
from dem_jax.io.modeldir import Model
from dem_jax.io.models import load_model, save_model
from dem_jax.io.run_layout import RunLayout, check_run_paths
from dem_jax.merge.engine import MergeInput, merge
from dem_jax.mixture.stage import taskpgm_from_config
from dem_jax.model.flops import forward_flops, train_flops
from dem_jax.pipeline.baselines import FISHER_MERGES, fisher_regmean_params
from dem_jax.pipeline.evaluate import evaluate_model
from dem_jax.pipeline.report import format_table, summary_rows, write_report
from dem_jax.pipeline.state import StageState, fingerprint, model_stamp
from dem_jax.search.run import build_scorer, search_from_config
from dem_jax.sharding.distributed import initialize_from_env
from dem_jax.sharding.rules import make_mesh
from dem_jax.train.loop import run_training
from dem_jax.vectors.store import save_vector
from dem_jax.vectors.vector import distribution_vector

PRETRAIN = "pretrain"


@dataclass
class PipelineResult:
    """Where the report is, and its content."""

    report_path: Path
    result: dict[str, Any]
    summary: str  # the terminal table


def _train_cost(cfg: RunConfig, config, steps: int, batch: int) -> dict[str, float]:
    tokens = steps * batch * cfg.data.seq_len
    flops = train_flops(config, batch, cfg.data.seq_len, steps)
    return {"tokens": tokens, "train_flops": flops, "total_flops": flops}


def _with_base(cfg: RunConfig, path: Path) -> RunConfig:
    """The config with ``path`` as its base model."""
    return dataclasses.replace(cfg, model=BaseModelConfig(path=str(path)))


def _pretrain(cfg: RunConfig, layout: RunLayout, log) -> tuple[RunConfig, dict | None]:
    """Pretrain a from-scratch base when asked; returns the config fine-tunes start from."""
    pre = cfg.pipeline.pretrain
    if pre.steps <= 0:
        return cfg, None
    names = sorted(pre.distributions or cfg.data.distributions)
    pre_cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train,
            steps=pre.steps,
            learning_rate=pre.learning_rate,
            batch_size=pre.batch_size,
            eval_every=0,
        ),
        data=dataclasses.replace(cfg.data, mixture="uniform"),
    )
    run_training(pre_cfg, PRETRAIN, log=log, distributions=names)
    model_cfg = load_model(layout.model(PRETRAIN)).config
    return _with_base(cfg, layout.model(PRETRAIN)), _train_cost(
        cfg, model_cfg, pre.steps, pre.batch_size
    )


def _mixture_name(spec) -> str:
    if isinstance(spec, str):
        return f"mixture-{spec}"
    return "mixture-" + "-".join(f"{k}{v:g}" for k, v in sorted(spec.items()))


def _train_mixture(cfg: RunConfig, spec, names: list[str], layout: RunLayout, log) -> Path:
    """One data-mixing run; retrained when the set of distributions changed."""
    name = _mixture_name(spec)
    out = layout.model(name)
    if out.exists():
        meta = load_model(out).metadata
        stale = None
        if sorted(meta.get("trained_on", [])) != names:
            stale = "distributions changed"
        elif spec == "taskpgm" and not _same_weights(
            meta.get("mixture"), read_proportions(layout.mixture_proportions, names)
        ):
            stale = "TaskPGM proportions changed"
        if stale:
            log(f"[{name}] {stale}: retraining the mixture")
            storage.rmtree(out)
            storage.rmtree(layout.checkpoints(name))
            layout.metrics(name).unlink(missing_ok=True)
    # Same data exposure as all the fine-tunes together, unless set otherwise.
    steps = cfg.pipeline.mixture_steps or cfg.train.steps * len(names)
    mix_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, mixture=spec),
        train=dataclasses.replace(cfg.train, steps=steps),
    )
    run_training(mix_cfg, name, log=log, distributions=names)
    return out


def _same_weights(trained: dict | None, raw: dict[str, float]) -> bool:
    """Whether a mixture run's recorded weights are ``raw`` normalised."""
    total = sum(raw.values())
    return (
        bool(trained)
        and set(trained) == set(raw)
        and all(abs(trained[n] - v / total) <= 1e-9 for n, v in raw.items())
    )


def _taskpgm(cfg: RunConfig, names: list[str], layout: RunLayout, state: StageState, log):
    """TaskPGM proportions from the fine-tunes, unless already computed for them."""
    d = cfg.data
    fp = fingerprint(
        names,
        [model_stamp(layout.model(n)) for n in names],
        dataclasses.asdict(cfg.pipeline.taskpgm),
        [dataclasses.asdict(d.distributions[n]) for n in names],
        (d.seq_len, d.prompt_template, d.add_bos, d.add_eos, d.shuffle_seed),
    )
    if state.is_done("taskpgm", fp, layout.mixture_proportions):
        return
    found = taskpgm_from_config(cfg, progress=log)
    state.mark("taskpgm", fp, proportions=found["proportions"])


def _vectors(base: Model, names: list[str], layout: RunLayout, state: StageState, log):
    """Each fine-tune's distribution vector, saved at ``layout.vector(name)``."""
    for name in names:
        fp = fingerprint(model_stamp(layout.model(name)), base.config.to_dict())
        if state.is_done(f"vector:{name}", fp, layout.vector(name)):
            continue
        finetuned = load_model(layout.model(name), mesh=None, dtype="float32")
        vector = distribution_vector(base, finetuned, name=name, model_path=layout.model(name))
        storage.makedirs(layout.vector(name).parent)
        save_vector(vector, layout.vector(name), overwrite=True)
        state.mark(f"vector:{name}", fp)
        log(f"[vectors] wrote {layout.vector(name)}")


def _baselines(cfg, scorer, base: Model, names, layout: RunLayout, state, log) -> dict:
    """Merges over the same vectors; each saved under models/<baseline>."""
    p = cfg.pipeline
    stamps = [model_stamp(layout.vector(n)) for n in names]
    ft_stamps = [model_stamp(layout.model(n)) for n in names]
    d = cfg.data
    made: dict[str, dict[str, Any]] = {}
    for baseline in p.baselines:
        out = layout.model(baseline)
        if baseline in FISHER_MERGES:  # statistics of the fine-tunes on validation rows
            fp = fingerprint(
                baseline,
                ft_stamps,
                p.eval_max_examples,
                p.regmean_alpha,
                cfg.search.batch_size,
                [dataclasses.asdict(d.distributions[n]) for n in names],
                (d.seq_len, d.prompt_template, d.add_bos, d.add_eos, d.shuffle_seed),
            )
        else:
            fp = fingerprint(baseline, stamps, p.density, p.seed, p.task_arithmetic_grid)
        if state.is_done(f"baseline:{baseline}", fp, out):
            made[baseline] = state.info(f"baseline:{baseline}")
            continue
        info: dict[str, Any] = {}
        if baseline in FISHER_MERGES:
            merged, _ = fisher_regmean_params(
                cfg, baseline, names, mesh=getattr(scorer, "mesh", None), progress=log
            )
            # Stored like the other merges, in the base's parameter dtype.
            params = jax.tree.map(lambda x: x.astype(base.config.param_dtype), merged)
            model = Model(base.config, params, base.hf_config, base.assets_dir)
            info = {"max_examples": p.eval_max_examples}
            if baseline == "regmean":
                info["alpha"] = p.regmean_alpha
        elif baseline == "task_arithmetic":
            # One λ for every vector, chosen by the same validation objective as DEM.
            tried = [
                (lam, scorer.evaluate(np.full(len(names), lam)).objective)
                for lam in p.task_arithmetic_grid
            ]
            lam = min(tried, key=lambda t: t[1])[0]
            info = {"lambda": lam, "tried": tried}
            params = scorer.merged_params(np.full(len(names), lam, np.float32))
            model = Model(base.config, params, base.hf_config, base.assets_dir)
        elif baseline == "uniform_soup":
            model = merge(
                "linear", None, [MergeInput(layout.model(n), {"weight": 1.0}) for n in names]
            )
        else:
            settings = {"weight": 1.0, "density": p.density}
            model = merge(
                baseline, base, [MergeInput(layout.vector(n), settings) for n in names], seed=p.seed
            )
            info = {"density": p.density}
        model.metadata = {**model.metadata, "baseline": baseline, **info}
        model.assets_dir = base.assets_dir
        save_model(model, out, format="orbax", overwrite=True)
        state.mark(f"baseline:{baseline}", fp, **info)
        made[baseline] = info
        log(f"[{baseline}] wrote {out}")
    return made


def run_pipeline(cfg: RunConfig, log=print) -> PipelineResult:
    """Run every stage (skipping completed ones) and write the report."""
    initialize_from_env()
    start = time.perf_counter()
    layout = RunLayout(cfg.output_dir)
    check_run_paths(cfg)
    storage.makedirs(layout.root)
    state = StageState(layout.root / "pipeline_state.json")
    names = sorted(cfg.data.distributions)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    costs: dict[str, dict[str, float]] = {}

    # 1. The base, and one fine-tune per distribution.
    ft_cfg, pre_cost = _pretrain(cfg, layout, log)
    if pre_cost:
        costs["pretrain (shared base)"] = pre_cost
    if ft_cfg.model.init is not None:  # from scratch without pretraining: materialise it
        run_training(ft_cfg, names[0], log=log)
        ft_cfg = _with_base(ft_cfg, layout.base_model)
    for name in names:
        run_training(ft_cfg, name, log=log)
    base = load_model(ft_cfg.model.path, dtype="float32")
    t = cfg.train
    for name in names:
        costs[f"fine-tune {name}"] = _train_cost(cfg, base.config, t.steps, t.batch_size)

    # 2. Distribution vectors, then DEM's weight search (writes models/dem).
    _vectors(base, names, layout, state, log)
    scorer, base_on_mesh, _ = build_scorer(ft_cfg, mesh, progress=log)
    search_fp = fingerprint(
        names, dataclasses.asdict(cfg.search), [model_stamp(layout.vector(n)) for n in names]
    )
    if not state.is_done("search", search_fp, layout.merged_model, layout.search_dir):
        found = search_from_config(
            ft_cfg, mesh, progress=log, scorer_and_base=(scorer, base_on_mesh, names)
        )
        state.mark(
            "search",
            search_fp,
            forward_equivalents=scorer.forward_equivalents,
            candidates=len(found.candidates),
        )
    chosen = _read_json(layout.search_dir / "chosen.json")
    val_rows = int(np.prod(scorer.batches["tokens"].shape[:2]))  # rows per forward-equivalent
    search_flops = state.info("search")["forward_equivalents"] * forward_flops(
        base.config, val_rows, cfg.data.seq_len
    )
    costs["weight search"] = {
        "tokens": 0,
        "train_flops": 0.0,
        "search_flops": search_flops,
        "total_flops": search_flops,
    }

    # 3. Baselines: merges over the same vectors, and data-mixing runs.
    baseline_info = _baselines(cfg, scorer, base_on_mesh, names, layout, state, log)
    mixtures = [_mixture_name(m) for m in cfg.pipeline.mixtures]
    for spec in cfg.pipeline.mixtures:
        if spec == "taskpgm":  # its proportions come from the fine-tunes
            _taskpgm(ft_cfg, names, layout, state, log)
        _train_mixture(ft_cfg, spec, names, layout, log)
        steps = cfg.pipeline.mixture_steps or t.steps * len(names)
        costs[f"data mixing {_mixture_name(spec)}"] = _train_cost(
            cfg, base.config, steps, t.batch_size
        )
    del scorer, base_on_mesh

    # 4. Evaluation of every model on every distribution.
    models = {"base": storage.path(ft_cfg.model.path), "dem": layout.merged_model}
    models.update({f"ft-{n}": layout.model(n) for n in names})
    models.update({m: layout.model(m) for m in mixtures})
    models.update({b: layout.model(b) for b in cfg.pipeline.baselines})
    tokenizer = load_tokenizer(cfg.data.tokenizer or ft_cfg.model.path)
    val_records = {n: distribution_records(cfg.data, n)[1] for n in names}
    evals = {}
    eval_settings = (dataclasses.asdict(cfg.pipeline), cfg.data.seq_len, cfg.data.prompt_template)
    for label, path in models.items():
        fp = fingerprint(label, model_stamp(path), names, eval_settings)
        if not state.is_done(f"eval:{label}", fp):
            log(f"[eval] {label}")
            result = evaluate_model(
                load_model(path, dtype="float32"), cfg, val_records, tokenizer, mesh=None
            )
            state.mark(f"eval:{label}", fp, **result)
        evals[label] = state.info(f"eval:{label}")

    # 5. Export, report.
    hf_dir = layout.root / "models" / "dem-hf"
    if cfg.pipeline.export_hf:
        fp = fingerprint(model_stamp(layout.merged_model))
        if not state.is_done("export", fp, hf_dir):
            save_model(load_model(layout.merged_model), hf_dir, format="hf", overwrite=True)
            state.mark("export", fp)
            log(f"[export] wrote {hf_dir}")
    result = _result(
        cfg,
        names,
        models,
        evals,
        chosen,
        baseline_info,
        costs,
        mixtures,
        time.perf_counter() - start,
        hf_dir if cfg.pipeline.export_hf else None,
    )
    report = write_report(result, layout.root / "report", layout.root)
    summary = format_table(summary_rows(result))
    return PipelineResult(report, result, summary)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _result(cfg, names, models, evals, chosen, baseline_info, costs, mixtures, wall, hf_dir):
    kinds = {"base": "base", "dem": "dem"}
    kinds.update({f"ft-{n}": "fine-tune" for n in names})
    kinds.update({m: "data mixing" for m in mixtures})
    kinds.update(
        {b: "merge baseline" if b in FISHER_MERGES else "vector baseline" for b in baseline_info}
    )
    dem_cost = sum(
        c["total_flops"]
        for k, c in costs.items()
        if k.startswith("fine-tune") or k == "weight search"
    )
    mixing = [c["total_flops"] for k, c in costs.items() if k.startswith("data mixing")]
    return {
        "distributions": names,
        "models": {
            label: {
                "kind": kinds[label],
                "path": str(path),
                "eval": evals[label],
                **({"settings": baseline_info[label]} if label in baseline_info else {}),
            }
            for label, path in models.items()
        },
        "dem": {
            "omega": chosen["omega"],
            "strategy": chosen["strategy"],
            "objective": chosen["objective"],
            "objective_value": chosen["objective_value"],
            "candidates_tried": chosen["candidates_tried"],
        },
        "cost": {
            "items": costs,
            "dem_total_flops": dem_cost,
            "mixing_runs": len(mixing),
            "mixing_per_run_flops": mixing[0] if mixing else 0.0,
            "mixing_total_flops": sum(mixing),
        },
        "hf_export": None if hf_dir is None else str(hf_dir),
        "wall_time_s": wall,
    }
