"""The training loop: one fine-tune (per distribution, or on the mixture).

    result = run_training(config, "math")        # base fine-tuned on one distribution
    result = run_training(config, MIXTURE)       # the data-mixing baseline

Resumes from the newest checkpoint automatically; SIGTERM (preemption) saves
a checkpoint and exits; the final model is written to
``RunLayout.model(name)`` as a dem-jax directory. A loss or gradient norm that
becomes NaN or inf stops the run with a DemError: checkpoints already saved stay,
no checkpoint of non-finite parameters and no final model are written.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dem_jax.config.model import ModelConfig
from dem_jax.config.run import RunConfig
from dem_jax.data.pipeline import (
    BatchIterator,
    eval_batches,
    load_splits,
    load_validation,
    mixture_weights,
    to_global,
    train_dataset,
)
from dem_jax.data.tokenize import check_ids_fit, check_tokenizer_fits, load_tokenizer
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import Model
from dem_jax.io.models import init_model, load_model, read_model_config, save_model
from dem_jax.io.run_layout import BASE, MIXTURE, RunLayout, check_run_paths
from dem_jax.model.flops import train_flops
from dem_jax.sharding.distributed import initialize_from_env
from dem_jax.sharding.rules import batch_sharding, make_mesh
from dem_jax.train.checkpointing import TrainCheckpoints
from dem_jax.train.host_memory import release_free_memory
from dem_jax.train.metrics import MetricsWriter
from dem_jax.train.optimizer import make_optimizer
from dem_jax.train.progress import Progress, format_summary, training_summary
from dem_jax.train.step import (
    all_finite,
    eval_step,
    first_nonfinite,
    init_state,
    jit_train_step,
    no_nonfinite_yet,
)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint; the run resumes when restarted."""


@dataclass
class TrainResult:
    """What a finished training run produced."""

    model_dir: Path
    steps: int
    tokens_trained: int  # input tokens processed (rows × seq_len × steps)
    final_eval: dict[str, dict[str, float]]  # distribution -> {"nll", "ppl", "tokens"}
    skipped: bool = False  # the model already existed


def _init_config(cfg: RunConfig) -> ModelConfig:
    if cfg.model.init is None:
        raise DemError("model: set model.path or model.init")
    init = dict(cfg.model.init)
    init.setdefault("param_dtype", cfg.train.param_dtype)
    init.setdefault("dtype", cfg.train.param_dtype)
    return ModelConfig.from_dict(init, where="model.init")


def base_vocab_size(cfg: RunConfig) -> tuple[int, str]:
    """(the base model's vocab_size, where it comes from), read without the weights."""
    if cfg.model.path is not None:
        return read_model_config(cfg.model.path).vocab_size, str(cfg.model.path)
    return _init_config(cfg).vocab_size, "model.init"


def base_model(cfg: RunConfig, mesh, name: str | None = None) -> tuple[Model, Path]:
    """(the model run ``name`` starts from, where it lives): model.path, or a model.init
    run's own base ``RunLayout.base_model``, initialised and saved once so distribution
    vectors can be taken against it. The run that makes the base itself (BASE: the
    pipeline's pretraining) starts from the initialisation saved at
    ``RunLayout.init_model`` instead."""
    dtype = cfg.train.param_dtype
    if cfg.model.path is not None:
        return load_model(cfg.model.path, mesh=mesh, dtype=dtype), storage.path(cfg.model.path)
    layout = RunLayout(cfg.output_dir)
    start = layout.init_model if name == BASE else layout.base_model
    if start.exists():
        return load_model(start, mesh=mesh, dtype=dtype), start
    if name != BASE and cfg.pipeline.pretrain.steps > 0:
        raise DemError(
            f"{start}: base model not found; this config pretrains its base "
            "(pipeline.pretrain.steps > 0): run `dem-jax pipeline` on it first, or set "
            "pipeline.pretrain.steps=0 to fine-tune the random initialisation"
        )
    model = init_model(_init_config(cfg), cfg.train.seed, mesh)
    model.assets_dir = storage.path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    storage.makedirs(start.parent)
    save_model(model, start, format="orbax")  # collective: every host takes part
    return model, start


def base_provenance(base_path, out_dir) -> dict[str, str]:
    """The ``base`` a trained model's metadata records: the base's absolute path and,
    for local paths, its path relative to the model (still right when the whole run
    directory is moved), so ``dem-jax vectors`` can tell a wrong ``--base``."""
    found = {"base": str(storage.absolute(base_path))}
    if not storage.is_url(base_path) and not storage.is_url(out_dir):
        found["base_relative"] = os.path.relpath(
            storage.absolute(base_path), storage.absolute(out_dir)
        )
    return found


def _evaluate(params, config, eval_sets, eval_fn, mesh) -> dict[str, dict[str, float]]:
    results = {}
    sharding = batch_sharding(mesh)
    for name, batches in eval_sets.items():
        total, count = 0.0, 0.0
        for batch in batches:
            nll, n = eval_fn(params, to_global(batch, sharding))
            total, count = total + float(nll), count + float(n)
        mean = total / max(count, 1.0)
        results[name] = {"nll": mean, "ppl": float(np.exp(mean)), "tokens": int(count)}
    release_free_memory()  # the evaluation's buffers, before the next step's
    return results


def run_training(
    cfg: RunConfig, name: str, log=print, distributions: list[str] | None = None
) -> TrainResult:
    """Train the base on distribution ``name``, or, when ``name`` is MIXTURE or
    ``distributions`` lists several, on their ``data.mixture``; the model goes to
    ``RunLayout.model(name)``."""
    initialize_from_env()
    layout = RunLayout(cfg.output_dir)
    check_run_paths(cfg)
    out_dir = layout.model(name)
    if out_dir.exists():
        log(f"[{name}] already trained: {out_dir}")
        return TrainResult(out_dir, 0, 0, {}, skipped=True)
    if not cfg.data.distributions:
        raise DemError("data.distributions: no distributions configured")
    if distributions is not None:
        names = sorted(distributions)
    else:
        names = sorted(cfg.data.distributions) if name == MIXTURE else [name]
    for n in names:
        if n not in cfg.data.distributions:
            known = ", ".join(sorted(cfg.data.distributions))
            raise DemError(f"unknown distribution {n!r} (configured: {known})")
    mixing = len(names) > 1 or name == MIXTURE
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.path)
    vocab_size, model_where = base_vocab_size(cfg)
    check_tokenizer_fits(tokenizer, vocab_size, model_where)

    # Training rows of the distributions trained on; validation rows of every one.
    train_splits, val_splits = {}, {}
    for n in sorted(cfg.data.distributions):
        if n in names:
            train_splits[n], val_splits[n] = load_splits(cfg.data, tokenizer, n)
        else:
            val_splits[n] = load_validation(cfg.data, tokenizer, n)
        pair = [val_splits[n]] + ([train_splits[n]] if n in names else [])
        arrays = (r[k] for split in pair for r in split.rows for k in ("tokens", "targets"))
        check_ids_fit(arrays, vocab_size, f"data.distributions.{n}")
    weights = (
        mixture_weights(cfg.data, train_splits, layout.mixture_proportions) if mixing else None
    )
    t = cfg.train
    pid, nproc = jax.process_index(), jax.process_count()
    dataset = train_dataset(train_splits, weights, t.batch_size, cfg.data.shuffle_seed, pid, nproc)
    eval_sets = {
        n: eval_batches(split, t.batch_size, t.eval_batches, pid, nproc)
        for n, split in val_splits.items()
    }

    base, base_path = base_model(cfg, mesh, name)
    config = base.config.replace(dtype=t.compute_dtype, remat=t.remat)
    base_hf_config = base.hf_config
    tx = make_optimizer(t)
    state = init_state(base.params, tx, donate=True)  # the state holds the only copy
    del base
    step_fn = jit_train_step(state, config=config, tx=tx, accum=t.grad_accum)
    eval_fn = jax.jit(functools.partial(eval_step, config=config))

    checkpoints = TrainCheckpoints(layout.checkpoints(name), t.keep_checkpoints, t.async_checkpoint)
    iterator = BatchIterator(dataset)
    start = checkpoints.latest_step() or 0
    meta = {
        "name": name,
        "distributions": names,
        "seq_len": cfg.data.seq_len,
        "batch_size": t.batch_size,
    }
    if start:
        state, data_state, saved_meta = checkpoints.restore(start, state)
        if saved_meta != meta:
            raise DemError(
                f"{layout.checkpoints(name)}: checkpoint was written by a different "
                f"run ({saved_meta}); use a new output_dir"
            )
        iterator.set_state(data_state)
        log(f"[{name}] resumed from step {start}")
    metrics = MetricsWriter(layout.metrics(name), layout.root / "tensorboard" / name, start)
    tokens_per_step = t.batch_size * cfg.data.seq_len

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
    progress = Progress(t.steps, f"[{name}] train", start=start, every=t.log_every)
    sharding = batch_sharding(mesh)
    watch = no_nonfinite_yet()

    def stop_if_diverged(step: int | None = None) -> None:  # `step`: check the params too
        params = None if step is None else state["params"]
        _stop_if_diverged(watch, checkpoints, name, params, step or 0)

    try:
        step_start = run_start = first_done = time.perf_counter()
        for step in range(start + 1, t.steps + 1):
            batch = to_global(next(iterator), sharding)
            if step == start + 1:
                # Compile both steps now (evaluation batches have the train batches'
                # shapes), not the evaluation in the middle of training, and hand back
                # what the compiler freed before the first step allocates beside it.
                step_fn.lower(state, batch).compile()
                eval_fn.lower(state["params"], batch).compile()
                release_free_memory()
            state, out = step_fn(state, batch)
            watch = _watch(watch, step, out)
            if step == start + 1:  # compilation and one step, kept out of the speed
                jax.block_until_ready(out["loss"])
                first_done = time.perf_counter()
            if step % t.log_every == 0 or step == t.steps:
                out = jax.device_get(out)
                stop_if_diverged()
                elapsed = time.perf_counter() - step_start
                tps = tokens_per_step * (t.log_every if step % t.log_every == 0 else 1) / elapsed
                step_start = time.perf_counter()
                metrics.write(
                    step,
                    "train",
                    loss=float(out["loss"]),
                    grad_norm=float(out["grad_norm"]),
                    tokens_per_s=tps,
                    tokens_seen=step * tokens_per_step,
                )
                progress.update(step, loss=float(out["loss"]), tok_s=round(tps))
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                stop_if_diverged()
                for n, r in _evaluate(state["params"], config, eval_sets, eval_fn, mesh).items():
                    metrics.write(step, f"eval/{n}", **r)
            if _should_stop(stop):
                stop_if_diverged(step)
                checkpoints.save(step, state, iterator.get_state(), meta, force=True)
                checkpoints.wait()
                raise Preempted(
                    f"[{name}] stopped by signal at step {step}; checkpoint saved, "
                    "re-run the same command to resume"
                )
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.steps:
                stop_if_diverged(step)
                checkpoints.save(step, state, iterator.get_state(), meta)
                release_free_memory()  # what a blocking save's writers freed
        loop_end = time.perf_counter()
        stop_if_diverged(t.steps)  # nothing non-finite is evaluated, saved or exported
        final = _evaluate(state["params"], config, eval_sets, eval_fn, mesh)
        for n, r in final.items():
            metrics.write(t.steps, f"eval/{n}", **r)
        if start < t.steps:
            checkpoints.save(t.steps, state, iterator.get_state(), meta, force=True)
        checkpoints.wait()
        release_free_memory()
    finally:
        signal.signal(signal.SIGTERM, previous)
        checkpoints.close()
        metrics.close()

    summary = training_summary(
        steps=t.steps - start,
        tokens_per_step=tokens_per_step,
        flops_per_step=train_flops(config, t.batch_size, cfg.data.seq_len),
        wall_s=time.perf_counter() - run_start,
        first_step_s=first_done - run_start,
        loop_s=loop_end - run_start,
        resumed_from=start,
    )
    trained = Model(
        config.replace(dtype=config.param_dtype, remat=False),
        state["params"],
        hf_config=base_hf_config,
        assets_dir=storage.path(cfg.data.tokenizer or cfg.model.path),
        metadata={
            "trained_on": names,
            "steps": t.steps,
            "mixture": weights,
            **base_provenance(base_path, out_dir),
            "train_summary": summary,
        },
    )
    storage.makedirs(out_dir.parent)
    save_model(trained, out_dir, format="orbax")
    log(f"[{name}] wrote {out_dir}")
    log(format_summary(name, summary, layout.metrics(name), layout.root / "tensorboard" / name))
    return TrainResult(out_dir, t.steps, t.steps * tokens_per_step, final)


_watch = jax.jit(first_nonfinite)
_all_finite = jax.jit(all_finite)


def _stop_if_diverged(watch, checkpoints: TrainCheckpoints, name: str, params, step: int) -> None:
    """DemError if a loss or gradient norm so far was NaN or inf (or, given ``params``,
    a parameter is), naming the step and the last checkpoint, which is kept: every
    checkpoint was checked here before it was saved."""
    seen = jax.device_get(watch)
    if int(seen["step"]):
        step, loss, grad_norm = int(seen["step"]), float(seen["loss"]), float(seen["grad_norm"])
        what = f"loss became {loss}"
        if math.isfinite(loss):
            what = f"gradient norm became {grad_norm}"
    elif params is not None and not bool(_all_finite(params)):
        what = "parameters became non-finite"
    else:
        return
    checkpoints.wait()
    good = checkpoints.latest_step()
    last = "no checkpoint was saved before it"
    if good:
        last = f"last good checkpoint: step {good} in {checkpoints.directory}"
    raise DemError(
        f"[{name}] training {what} at step {step}; {last}; no model was written "
        "(lower train.learning_rate, or check the data)"
    )


def _should_stop(stop: dict) -> bool:
    """Whether any host was asked to stop (all hosts must agree before saving)."""
    flag = stop["signal"] is not None
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(jnp.asarray(flag))))
