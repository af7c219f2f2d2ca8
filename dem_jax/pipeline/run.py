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
from jax.experimental import multihost_utils

from dem_jax.config.run import BaseModelConfig, RunConfig
from dem_jax.data.pipeline import distribution_records, read_proportions
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.io import storage
from dem_jax.io.modeldir import DEM_METADATA, Model
from dem_jax.io.models import load_model, read_model_config, save_model
from dem_jax.io.orbax import read_metadata
from dem_jax.io.run_layout import BASE, RunLayout, check_run_paths
from dem_jax.merge.engine import MergeInput, merge
from dem_jax.mixture.stage import taskpgm_from_config
from dem_jax.model.flops import forward_flops
from dem_jax.pipeline import stages as st
from dem_jax.pipeline.baselines import FISHER_MERGES, fisher_regmean_params
from dem_jax.pipeline.costs import cost_summary, train_cost
from dem_jax.pipeline.evaluate import evaluate_model
from dem_jax.pipeline.report import format_table, summary_rows, write_report
from dem_jax.pipeline.result import build_result
from dem_jax.pipeline.stages import StageLog, stage_names
from dem_jax.pipeline.state import StageState, fingerprint, model_stamp
from dem_jax.search.run import build_scorer, search_from_config
from dem_jax.sharding.distributed import initialize_from_env, is_main_process
from dem_jax.sharding.rules import make_mesh
from dem_jax.train.loop import base_model, run_training
from dem_jax.vectors.store import save_vector
from dem_jax.vectors.vector import distribution_vector

# Where dem-jax 0.1.0 pipelines put their pretrained base (models/base was then its random
# initialisation); such a run directory is moved to today's names on the next run.
LEGACY_PRETRAIN = "pretrain"


@dataclass
class PipelineResult:
    """Where the report is, and its content."""

    report_path: Path
    result: dict[str, Any]
    summary: str  # the terminal table


def _trained_meta(path) -> dict[str, Any]:
    """A dem-jax model directory's metadata (no weights read); {} if it has none."""
    if not (storage.path(path) / DEM_METADATA).exists():
        return {}
    return read_metadata(path).get("metadata") or {}


def _train_cost(cfg: RunConfig, config, steps: int, batch: int, model_dir) -> dict[str, Any]:
    """A training run's tokens and FLOPs, and the wall time its model recorded."""
    summary = _trained_meta(model_dir).get("train_summary") or {}
    return train_cost(config, steps, batch, cfg.data.seq_len, wall_s=summary.get("wall_s"))


def _with_base(cfg: RunConfig, path: Path) -> RunConfig:
    """The config with ``path`` as its base model."""
    return dataclasses.replace(cfg, model=BaseModelConfig(path=str(path)))


def _adopt_legacy_base(layout: RunLayout, log) -> None:
    """Before pretraining: a models/base that is not pretrained (a random
    initialisation, as dem-jax 0.1.0 or a run without pretraining left it) moves to
    models/init, and a 0.1.0 run's pretrained base (models/pretrain, with its
    checkpoints and logs) to models/base, so the directory named base is the real base."""
    old, base = layout.model(LEGACY_PRETRAIN), layout.base_model
    if "trained_on" in _trained_meta(base) or not (old.exists() or base.exists()):
        return
    if is_main_process():
        if base.exists() and layout.init_model.exists():
            storage.rmtree(base)  # both hold the one initialisation
        elif base.exists():
            storage.replace(base, layout.init_model)
        moves = [
            (old, base),
            (layout.checkpoints(LEGACY_PRETRAIN), layout.checkpoints(BASE)),
            (layout.metrics(LEGACY_PRETRAIN), layout.metrics(BASE)),
            (layout.root / "tensorboard" / LEGACY_PRETRAIN, layout.root / "tensorboard" / BASE),
        ]
        for src, dst in moves:
            if src.exists() and not dst.exists():
                storage.replace(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dem-jax: base renamed")
    if old.exists() or base.exists():
        log(f"[base] renamed {old} (an earlier dem-jax's name for the pretrained base) to {base}")
    else:
        log(f"[base] {base} was a random initialisation: moved to {layout.init_model}")


def _own_base(cfg: RunConfig, names, layout: RunLayout, mesh, log):
    """models/base for a model.init run: pretrained when ``pipeline.pretrain.steps`` > 0
    (from the random initialisation in models/init), else the initialisation itself.
    Returns the config the fine-tunes start from and the pretraining's cost."""
    pre = cfg.pipeline.pretrain
    if pre.steps <= 0:
        base_model(cfg, mesh)  # initialised and saved once
        return _with_base(cfg, layout.base_model), None
    _adopt_legacy_base(layout, log)
    pre_cfg = st.pretrain_config(cfg)
    run_training(pre_cfg, BASE, log=log, distributions=sorted(pre.distributions or names))
    model_cfg = read_model_config(layout.base_model)
    cost = _train_cost(cfg, model_cfg, pre.steps, pre.batch_size, layout.base_model)
    return _with_base(cfg, layout.base_model), cost


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
    steps = _mixture_steps(cfg, names)
    mix_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, mixture=spec),
        train=dataclasses.replace(cfg.train, steps=steps),
    )
    run_training(mix_cfg, name, log=log, distributions=names)
    return out


def _mixture_steps(cfg: RunConfig, names: list[str]) -> int:
    """Same data exposure as all the fine-tunes together, unless set otherwise."""
    return cfg.pipeline.mixture_steps or cfg.train.steps * len(names)


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
    """Run every stage (skipping completed ones) and write the report; each stage
    begins with a ``stage k/N: name`` line on ``log``."""
    initialize_from_env()
    start = time.perf_counter()
    layout = RunLayout(cfg.output_dir)
    check_run_paths(cfg)
    storage.makedirs(layout.root)
    state = StageState(layout.root / "pipeline_state.json")
    names = sorted(cfg.data.distributions)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    stages = StageLog(stage_names(cfg), log)
    costs: dict[str, dict[str, Any]] = {}
    t = cfg.train

    # 1. The base, and one fine-tune per distribution.
    ft_cfg = cfg
    if cfg.model.init is not None:  # from scratch: models/base, pretrained when asked
        with stages.run(st.BASE, str(layout.base_model)):
            ft_cfg, pre_cost = _own_base(cfg, names, layout, mesh, log)
        if pre_cost:
            costs["pretrain (shared base)"] = pre_cost
    with stages.run(st.FINETUNES, ", ".join(names)):
        for name in names:
            run_training(ft_cfg, name, log=log)
    base = load_model(ft_cfg.model.path, dtype="float32")
    for name in names:
        costs[f"fine-tune {name}"] = _train_cost(
            cfg, base.config, t.steps, t.batch_size, layout.model(name)
        )

    # 2. Distribution vectors, then DEM's weight search (writes models/dem).
    with stages.run(st.VECTORS, str(layout.vector("*").parent)):
        _vectors(base, names, layout, state, log)
    with stages.run(st.SEARCH, cfg.search.strategy):
        search_start = time.perf_counter()
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
                wall_s=round(time.perf_counter() - search_start, 3),
            )
    chosen = _read_json(layout.search_dir / "chosen.json")
    table = _read_json(layout.search_dir / "candidates.json")
    val_rows = int(np.prod(scorer.batches["tokens"].shape[:2]))  # rows per forward-equivalent
    search_flops = state.info("search")["forward_equivalents"] * forward_flops(
        base.config, val_rows, cfg.data.seq_len
    )
    costs["weight search"] = {
        "tokens": 0,
        "train_flops": 0.0,
        "search_flops": search_flops,
        "total_flops": search_flops,
        "wall_s": state.info("search").get("wall_s"),
    }

    # 3. Baselines: merges over the same vectors, and data-mixing runs.
    baseline_info: dict[str, dict[str, Any]] = {}
    if cfg.pipeline.baselines:
        with stages.run(st.MERGES, ", ".join(cfg.pipeline.baselines)):
            baseline_info = _baselines(cfg, scorer, base_on_mesh, names, layout, state, log)
    del scorer, base_on_mesh
    mixtures = [_mixture_name(m) for m in cfg.pipeline.mixtures]
    if "taskpgm" in cfg.pipeline.mixtures:  # its proportions come from the fine-tunes
        with stages.run(st.TASKPGM, str(layout.mixture_proportions)):
            _taskpgm(ft_cfg, names, layout, state, log)
    if mixtures:
        with stages.run(st.MIXING, ", ".join(mixtures)):
            for spec, label in zip(cfg.pipeline.mixtures, mixtures, strict=True):
                out = _train_mixture(ft_cfg, spec, names, layout, log)
                steps = _mixture_steps(cfg, names)
                costs[f"data mixing {label}"] = _train_cost(
                    cfg, base.config, steps, t.batch_size, out
                )

    # 4. Evaluation of every model on every distribution.
    models = {"base": storage.path(ft_cfg.model.path), "dem": layout.merged_model}
    models.update({f"ft-{n}": layout.model(n) for n in names})
    models.update({m: layout.model(m) for m in mixtures})
    models.update({b: layout.model(b) for b in cfg.pipeline.baselines})
    with stages.run(st.EVALUATION, f"{len(models)} models"):
        evals = _evaluate_all(cfg, ft_cfg, names, models, state, log)

    # 5. Export, report.
    hf_dir = layout.root / "models" / "dem-hf"
    if cfg.pipeline.export_hf:
        with stages.run(st.EXPORT, str(hf_dir)):
            fp = fingerprint(model_stamp(layout.merged_model))
            if not state.is_done("export", fp, hf_dir):
                save_model(load_model(layout.merged_model), hf_dir, format="hf", overwrite=True)
                state.mark("export", fp)
                log(f"[export] wrote {hf_dir}")
    with stages.run(st.REPORT, str(layout.root / "report")):
        mixing_estimate = train_cost(
            base.config, _mixture_steps(cfg, names), t.batch_size, cfg.data.seq_len
        )
        result = build_result(
            cfg,
            names,
            models,
            evals,
            chosen,
            table,
            baseline_info,
            {m: _trained_meta(layout.model(m)) for m in mixtures},
            cost_summary(costs, table, mixtures, mixing_estimate),
            stages.wall_s,
            time.perf_counter() - start,
            hf_dir if cfg.pipeline.export_hf else None,
        )
        report = write_report(result, layout.root / "report", layout.root)
    summary = format_table(summary_rows(result))
    return PipelineResult(report, result, summary)


def _evaluate_all(cfg, ft_cfg, names, models, state: StageState, log) -> dict[str, Any]:
    """Every model's evaluation on every distribution (each skipped when done)."""
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
    return evals


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
