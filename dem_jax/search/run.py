"""Merge-weight (omega) search by validation perplexity, all in device memory.

DEM's merged model is Θ + Σ_i ω_i ΔΘ_i. A :class:`MergeScorer` holds the base
Θ, the distribution vectors ΔΘ_i and every validation batch on the device
mesh once; scoring a candidate ω is one call of a jitted function that
builds the merge on device and runs a ``lax.scan`` over all validation
batches. ω is a traced argument, so candidates never recompile and no
checkpoint is written per candidate.

Strategies (``SearchConfig.strategy``):

* ``grid``: the paper's search, the Cartesian product of per-distribution
  value lists;
* ``random``: Dirichlet(concentration) samples scaled to sum to ``scale``;
* ``gradient``: Adam on ω. The merge is linear in ω, so the gradient of a
  batch's NLL with respect to ω is the vector-Jacobian product of the merge
  applied to the gradient with respect to the merged parameters: one
  backward pass gives every ∂NLL/∂ω_i. With ``per_layer`` each distribution
  gets one ω per layer for the stacked layer parameters plus one for the
  rest (embeddings, final norm, output head): ω has shape (k, L + 1).

Objectives, from m_d = each distribution's token-weighted mean NLL on its
own held-out split (= its log-perplexity):

* ``mean_log_ppl`` (default, the paper's): mean_d m_d;
* ``weighted_log_ppl``: Σ_d w_d m_d / Σ_d w_d with ``objective_weights``;
* ``max_log_ppl``: max_d m_d, the worst distribution (gradient: that one's).

Cost is counted in forward-equivalents over the whole validation set: a
candidate costs 1, a gradient step 3 (a backward pass counted as 2
forwards). The merge itself (k multiply-adds per parameter) is left out: it
is small next to a forward pass over B*T tokens per batch.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dem_jax.api import load_model, save_model
from dem_jax.config.run import ModelConfig, RunConfig, SearchConfig
from dem_jax.data.pipeline import distribution_records
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import Model, atomic_directory
from dem_jax.io.run_layout import RunLayout
from dem_jax.model.losses import batch_nll
from dem_jax.model.transformer import param_axes
from dem_jax.search.score import EncodedSet, Score, check_batch_size, pad_batches, place_params
from dem_jax.sharding.rules import BATCH_AXES, make_mesh, param_shardings

Progress = Callable[[str], None]
OBJECTIVES = ("mean_log_ppl", "weighted_log_ppl", "max_log_ppl")
FORWARDS_PER_EVAL = 1.0
FORWARDS_PER_GRADIENT = 3.0  # forward + backward, the backward counted as 2 forwards


# --------------------------------------------------------------------------
# The merge, and the jitted merge-and-score functions
# --------------------------------------------------------------------------


def layer_leaves(config: ModelConfig) -> dict[str, Any]:
    """True for every parameter stacked over layers (leading ``layers`` axis)."""
    return jax.tree.map(
        lambda axes: bool(axes) and axes[0] == "layers",
        param_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _leaf_weight(w: jax.Array, stacked: bool, ndim: int) -> jax.Array:
    """One distribution's weight for one leaf: a scalar, or (L,) per layer broadcast
    over the leaf's other dimensions; the last per-layer entry weighs non-layer leaves."""
    if w.ndim == 0:
        return w
    if stacked:
        return w[:-1].reshape(-1, *([1] * (ndim - 1)))
    return w[-1]


def merge_params(base: Any, vectors: Sequence[Any], omega: jax.Array, stacked: Any) -> Any:
    """Θ + Σ_i ω_i ΔΘ_i, leaf by leaf, in float32, cast back to the base's dtype.

    ``omega`` is (k,), or (k, L + 1) for per-layer weights; ``stacked`` is
    :func:`layer_leaves` of the model.
    """

    def leaf(is_stacked, b, *vs):
        acc = b.astype(jnp.float32)
        for i, v in enumerate(vs):
            acc = acc + _leaf_weight(omega[i], is_stacked, b.ndim) * v.astype(jnp.float32)
        return acc.astype(b.dtype)

    return jax.tree.map(leaf, stacked, base, *vectors)


def _make_scan_fn(config: ModelConfig, num_sets: int, with_grad: bool):
    """A jittable (omega, base, vectors, batches, set_ids) -> per-set sums [and Jacobian]."""
    stacked = layer_leaves(config)

    def fn(omega, base, vectors, batches, set_ids):
        def merge(w):
            return merge_params(base, vectors, w, stacked)

        if with_grad:
            params, merge_vjp = jax.vjp(merge, omega)
        else:
            params = merge(omega)

        def body(carry, xs):
            batch, set_id = xs
            onehot = jax.nn.one_hot(set_id, num_sets, dtype=jnp.float32)  # (S,)
            if with_grad:
                (nll, count), g_params = jax.value_and_grad(
                    lambda p: batch_nll(p, config, batch), has_aux=True
                )(params)
                (g_omega,) = merge_vjp(g_params)  # d nll / d omega, omega's shape
                jac = onehot.reshape(-1, *([1] * omega.ndim)) * g_omega.astype(jnp.float32)
                carry = {**carry, "jac": carry["jac"] + jac}
            else:
                nll, count = batch_nll(params, config, batch)
            return {
                **carry,
                "nll": carry["nll"] + onehot * nll,
                "count": carry["count"] + onehot * count,
            }, None

        init = {"nll": jnp.zeros(num_sets), "count": jnp.zeros(num_sets)}
        if with_grad:
            init["jac"] = jnp.zeros((num_sets, *omega.shape))
        out, _ = jax.lax.scan(body, init, (batches, set_ids))
        return out

    return jax.jit(fn)


# --------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------


def objective_value(
    mean_nll: np.ndarray, objective: str = "mean_log_ppl", weights: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """(objective, d objective / d mean_nll) from per-distribution mean NLLs."""
    m = np.asarray(mean_nll, np.float64)
    if objective == "mean_log_ppl":
        return float(m.mean()), np.full_like(m, 1.0 / len(m))
    if objective == "weighted_log_ppl":
        w = np.asarray(weights, np.float64) / np.sum(weights)
        return float(w @ m), w
    if objective == "max_log_ppl":
        worst = int(np.argmax(m))
        return float(m[worst]), np.eye(len(m))[worst]
    raise DemError(f"search.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")


# --------------------------------------------------------------------------
# The scorer: base, vectors and validation batches held on the mesh
# --------------------------------------------------------------------------


@dataclass
class Candidate:
    """One evaluated ω."""

    omega: np.ndarray  # (k,) or (k, L + 1)
    nll_sum: np.ndarray  # (S,) summed NLL per validation set
    tokens: np.ndarray  # (S,) loss tokens per validation set
    objective: float
    grad: np.ndarray | None = None  # d objective / d omega (gradient strategy)
    forward_equivalents: float = 0.0  # cumulative cost of the search up to this candidate

    @property
    def mean_nll(self) -> np.ndarray:
        """Per-set log-perplexity."""
        return self.nll_sum / self.tokens


class MergeScorer:
    """Scores Θ + Σ ω_i ΔΘ_i on validation sets for any ω, without recompiling.

    ``vectors`` are parameter pytrees shaped like ``base``; ``sets`` maps a
    validation set's name to its rows (:func:`dem_jax.score.encode_records`).
    Everything is placed once: parameters on their shardings, the batches
    stacked to (N, B, T) with B split over the mesh's data-parallel axes.
    """

    def __init__(
        self,
        config: ModelConfig,
        base: Any,
        vectors: Sequence[Any],
        sets: Mapping[str, EncodedSet],
        batch_size: int,
        mesh: Mesh | None = None,
        max_batches: int = 0,
        objective: str = "mean_log_ppl",
        objective_weights: Sequence[float] | None = None,
    ):
        if not vectors:
            raise DemError("search: no distribution vectors to merge")
        check_batch_size(batch_size, mesh, "search.batch_size")
        self.config, self.mesh = config, mesh
        self.num_vectors, self.set_names = len(vectors), list(sets)
        self.objective, self.weights = objective, objective_weights
        self.base = place_params(base, config, mesh)
        self.vectors = [place_params(v, config, mesh) for v in vectors]
        self.batches, self.set_ids = self._place_batches(sets, batch_size, max_batches)
        self.bytes = np.array([s.bytes if max_batches == 0 else 0 for s in sets.values()], np.int64)
        self.forward_equivalents = 0.0
        self._eval = _make_scan_fn(config, len(sets), with_grad=False)
        self._grad = _make_scan_fn(config, len(sets), with_grad=True)
        self._merge = jax.jit(
            lambda base, vectors, omega: merge_params(base, vectors, omega, layer_leaves(config)),
            out_shardings=None if mesh is None else param_shardings(config, mesh),
        )

    def _place_batches(self, sets, batch_size, max_batches):
        batches, ids = [], []
        for i, (name, encoded) in enumerate(sets.items()):
            mine = pad_batches(encoded.rows, batch_size, max_batches)
            if not mine or encoded.tokens == 0:
                raise DemError(f"search: validation set {name!r} has no loss tokens")
            batches += mine
            ids += [i] * len(mine)
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}  # (N, B, T)
        if self.mesh is None:
            return jax.device_put(stacked), jax.device_put(np.asarray(ids, np.int32))
        sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES, None))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return (
            jax.device_put(stacked, sharding),
            jax.device_put(np.asarray(ids, np.int32), replicated),
        )

    def omega_shape(self, per_layer: bool = False) -> tuple[int, ...]:
        """(k,), or (k, L + 1) with one ω per layer and one for non-layer parameters."""
        k = self.num_vectors
        return (k, self.config.num_layers + 1) if per_layer else (k,)

    def _check(self, omega) -> jax.Array:
        omega = jnp.asarray(omega, jnp.float32)
        if omega.shape not in (self.omega_shape(False), self.omega_shape(True)):
            raise DemError(
                f"search: omega has shape {omega.shape}, expected {self.omega_shape(False)} "
                f"or {self.omega_shape(True)}"
            )
        return omega

    def evaluate(self, omega, with_grad: bool = False) -> Candidate:
        """Scores of one ω (and d objective / d ω with ``with_grad``)."""
        omega = self._check(omega)
        fn = self._grad if with_grad else self._eval
        out = jax.device_get(fn(omega, self.base, self.vectors, self.batches, self.set_ids))
        nll, count = np.asarray(out["nll"], np.float64), np.asarray(out["count"], np.float64)
        value, d_mean = objective_value(nll / count, self.objective, self.weights)
        grad = None
        if with_grad:
            # objective(m), m_s = nll_s / count_s, counts independent of omega.
            grad = np.tensordot(d_mean / count, np.asarray(out["jac"], np.float64), axes=1)
        self.forward_equivalents += FORWARDS_PER_GRADIENT if with_grad else FORWARDS_PER_EVAL
        return Candidate(
            np.asarray(omega, np.float64), nll, count, value, grad, self.forward_equivalents
        )

    def merged_params(self, omega) -> Any:
        """The merged parameters for ``omega``, on the parameters' shardings."""
        return self._merge(self.base, self.vectors, self._check(omega))

    def scores(self, candidate: Candidate) -> dict[str, Score]:
        """Per-set :class:`~dem_jax.score.Score` of a candidate."""
        return {
            name: Score(float(candidate.nll_sum[i]), int(candidate.tokens[i]), int(self.bytes[i]))
            for i, name in enumerate(self.set_names)
        }


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Every candidate tried, in order, and the chosen one."""

    names: list[str]  # distributions, in ω order (= validation set order)
    strategy: str
    objective: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def best_index(self) -> int:
        """Index of the candidate with the lowest objective (the first on ties)."""
        return int(np.argmin([c.objective for c in self.candidates]))

    @property
    def best(self) -> Candidate:
        """The chosen candidate."""
        return self.candidates[self.best_index]


def grid_omegas(cfg: SearchConfig, names: Sequence[str]) -> np.ndarray:
    """The Cartesian product of per-distribution value lists, (n, k)."""
    if isinstance(cfg.grid, dict):
        unknown = sorted(set(cfg.grid) - set(names))
        if unknown:
            raise DemError(
                f"search.grid: unknown distribution {unknown[0]!r} (searching: {', '.join(names)})"
            )
        missing = [n for n in names if n not in cfg.grid]
        if missing:
            raise DemError(f"search.grid: no values for distribution {missing[0]!r}")
        lists = [cfg.grid[n] for n in names]
    else:
        lists = [cfg.grid] * len(names)
    return np.array(list(itertools.product(*lists)), np.float64).reshape(-1, len(names))


def dirichlet_omegas(cfg: SearchConfig, k: int) -> np.ndarray:
    """``samples`` Dirichlet(concentration) draws scaled to sum to ``scale``, (n, k)."""
    rng = np.random.default_rng(cfg.seed)
    return cfg.scale * rng.dirichlet(np.full(k, cfg.concentration), size=cfg.samples)


def _describe(c: Candidate) -> str:
    omega = np.round(c.omega if c.omega.ndim == 1 else c.omega.mean(axis=1), 3).tolist()
    return f"omega={omega} objective={c.objective:.5f}"


def run_search(
    scorer: MergeScorer, cfg: SearchConfig, names: Sequence[str], progress: Progress | None = None
) -> SearchResult:
    """Run ``cfg.strategy`` on ``scorer``; every candidate is kept in the result."""
    result = SearchResult(list(names), cfg.strategy, cfg.objective)
    log = progress or (lambda _: None)
    start = time.perf_counter()
    if cfg.strategy == "gradient":
        import optax

        tx = optax.adam(cfg.learning_rate)

        @jax.jit  # eager optax costs tens of ms of dispatch per step on a host CPU
        def adam_step(omega, state, grad):
            updates, state = tx.update(grad, state, omega)
            return optax.apply_updates(omega, updates), state

        omega = jnp.full(scorer.omega_shape(cfg.per_layer), cfg.init, jnp.float32)
        state = tx.init(omega)
        for step in range(cfg.steps):
            cand = scorer.evaluate(omega, with_grad=True)
            result.candidates.append(cand)
            log(f"search step {step + 1}/{cfg.steps}: {_describe(cand)}")
            omega, state = adam_step(omega, state, jnp.asarray(cand.grad, jnp.float32))
    else:
        if cfg.strategy == "grid":
            omegas = grid_omegas(cfg, names)
        else:
            omegas = dirichlet_omegas(cfg, len(names))
        for i, omega in enumerate(omegas):
            cand = scorer.evaluate(omega)
            result.candidates.append(cand)
            log(f"search candidate {i + 1}/{len(omegas)}: {_describe(cand)}")
    log(
        f"search: best {_describe(result.best)} after {len(result.candidates)} candidates, "
        f"{scorer.forward_equivalents:g} forward-equivalents, {time.perf_counter() - start:.1f}s"
    )
    return result


def omega_dict(omega: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """ω by distribution: a float, or {"layers": [...], "other": float} per layer."""
    omega = np.asarray(omega)
    if omega.ndim == 1:
        return {n: float(w) for n, w in zip(names, omega, strict=True)}
    return {
        n: {"layers": [float(x) for x in w[:-1]], "other": float(w[-1])}
        for n, w in zip(names, omega, strict=True)
    }


def candidate_record(c: Candidate, names: Sequence[str], set_names: Sequence[str]) -> dict:
    """A flat, JSON-able row of the candidate table."""
    row: dict[str, Any] = {}
    omega = np.asarray(c.omega)
    for i, n in enumerate(names):
        if omega.ndim == 1:
            row[f"omega_{n}"] = float(omega[i])
        else:
            row.update({f"omega_{n}_layer{l}": float(w) for l, w in enumerate(omega[i, :-1])})
            row[f"omega_{n}_other"] = float(omega[i, -1])
    for i, n in enumerate(set_names):
        mean = float(c.nll_sum[i] / c.tokens[i])
        row[f"nll_{n}"] = mean
        row[f"ppl_{n}"] = math.exp(mean)
        row[f"tokens_{n}"] = int(c.tokens[i])
    row["objective"] = c.objective
    row["forward_equivalents"] = c.forward_equivalents
    if c.grad is not None:
        row["grad_norm"] = float(np.linalg.norm(c.grad))
    return row


# --------------------------------------------------------------------------
# From a run config: inputs, outputs, the merged model
# --------------------------------------------------------------------------


def search_names(run: RunConfig) -> list[str]:
    """The distributions to merge: ``search.distributions`` or all configured ones."""
    configured = list(run.data.distributions)
    if not configured:
        raise DemError("data.distributions: no distributions configured")
    names = list(run.search.distributions or configured)
    for name in names:
        if name not in run.data.distributions:
            raise DemError(
                f"search.distributions: unknown distribution {name!r} "
                f"(configured: {', '.join(configured)})"
            )
    if len(set(names)) != len(names):
        raise DemError("search.distributions: a distribution is listed twice")
    return names


def validation_records(run: RunConfig, name: str) -> list[dict[str, Any]]:
    """A distribution's held-out records, exactly those training holds out."""
    return distribution_records(run.data, name)[1]


def objective_weights(cfg: SearchConfig, names: Sequence[str]) -> list[float] | None:
    """``search.objective_weights`` in distribution order (every name needs one)."""
    if cfg.objective != "weighted_log_ppl":
        return None
    weights = cfg.objective_weights or {}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DemError(f"search.objective_weights: unknown distribution {unknown[0]!r}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise DemError(f"search.objective_weights: no weight for distribution {missing[0]!r}")
    return [float(weights[n]) for n in names]


def base_model_path(run: RunConfig) -> Path:
    """``model.path``, or the run's own base model when it is initialised from scratch."""
    if run.model.path is not None:
        return storage.path(run.model.path)
    path = RunLayout(run.output_dir).base_model
    if not path.exists():
        raise DemError(f"{path}: base model not found (model.init runs write it when training)")
    return path


def load_vectors(
    run: RunConfig, names: Sequence[str], base: Model, mesh: Mesh | None, progress=None
) -> list[Any]:
    """ΔΘ_i per distribution, float32, on the base parameters' shardings: the saved
    vector at ``layout.vector(name)`` if there is one, else the fine-tuned model at
    ``layout.model(name)`` minus the base."""
    from dem_jax.vectors import vector as vectors_lib

    layout = RunLayout(run.output_dir)
    out = []
    for name in names:
        vector_dir, model_dir = layout.vector(name), layout.model(name)
        if vectors_lib.is_vector_dir(vector_dir):
            vector = vectors_lib.load_vector(vector_dir, mesh=mesh)
            vectors_lib.check_compatible(base.config, vector.config, "base model", str(vector_dir))
            source = vector_dir
        elif model_dir.exists():
            finetuned = load_model(model_dir, mesh=mesh)
            vector = vectors_lib.distribution_vector(
                base, finetuned, name=name, model_path=model_dir
            )
            del finetuned  # only ΔΘ stays on device
            source = model_dir
        else:
            raise DemError(
                f"{model_dir}: fine-tuned model for distribution {name!r} not found "
                f"(train it with: dem-jax train CONFIG.yaml --distribution {name})"
            )
        out.append(vector.params)
        if progress is not None:
            progress(f"search: distribution vector {name!r} from {source}")
    return out


def build_scorer(run: RunConfig, mesh: Mesh | None = None, progress=None):
    """(scorer, base model, distribution names) for a run: the base, every
    distribution vector and every validation set loaded onto ``mesh`` (default:
    the config's ``mesh`` section)."""
    from dem_jax.search.score import encode_records, resolve_tokenizer

    names = search_names(run)
    weights = objective_weights(run.search, names)
    if run.search.strategy == "grid":
        grid_omegas(run.search, names)  # bad grid keys fail before anything is loaded
    records = {name: validation_records(run, name) for name in names}
    if mesh is None:
        mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    # The dtype training fine-tuned in, so ΔΘ = Θ_i − Θ is taken at full precision.
    base = load_model(base_model_path(run), mesh=mesh, dtype=run.train.param_dtype)
    tokenizer = resolve_tokenizer(run.data.tokenizer, base)
    d = run.data
    sets = {
        name: encode_records(
            recs, tokenizer, d.seq_len, d.packing, d.prompt_template, d.add_bos, d.add_eos
        )
        for name, recs in records.items()
    }
    vectors = load_vectors(run, names, base, mesh, progress)
    scorer = MergeScorer(
        base.config,
        base.params,
        vectors,
        sets,
        run.search.batch_size,
        mesh,
        run.search.max_batches,
        run.search.objective,
        weights,
    )
    return scorer, base, names


def search_from_config(
    run: RunConfig,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
    save_merged: bool = True,
    scorer_and_base=None,
) -> SearchResult:
    """The ``dem-jax search`` stage: load the base, the vectors and the validation
    data, search ω, write the table, the chosen ω, the plot and the merged model.

    ``mesh`` defaults to the config's ``mesh`` section; ``scorer_and_base`` reuses
    what :func:`build_scorer` returned.
    """
    scorer, base, names = scorer_and_base or build_scorer(run, mesh, progress)
    result = run_search(scorer, run.search, names, progress)
    layout = RunLayout(run.output_dir)
    write_search_outputs(result, scorer, layout.search_dir, progress)
    if save_merged:
        save_merged_model(result, scorer, base, layout.merged_model)
        if progress is not None:
            progress(f"search: wrote merged model {layout.merged_model}")
    return result


def write_search_outputs(
    result: SearchResult, scorer: MergeScorer, out_dir: Path, progress: Progress | None = None
) -> Path:
    """candidates.csv, candidates.json, chosen.json and search.png, written atomically."""
    from dem_jax.search.plots import plot_search

    names, sets = result.names, scorer.set_names
    rows = [candidate_record(c, names, sets) for c in result.candidates]
    best = result.best
    chosen = {
        "strategy": result.strategy,
        "objective": result.objective,
        "objective_value": best.objective,
        "candidate": result.best_index,
        "distributions": names,
        "omega": omega_dict(best.omega, names),
        "scores": {n: s.to_dict() for n, s in scorer.scores(best).items()},
        "candidates_tried": len(result.candidates),
        "forward_equivalents": scorer.forward_equivalents,
    }
    table = {
        "distributions": names,
        "strategy": result.strategy,
        "objective": result.objective,
        "candidates": [
            {
                "index": i,
                "omega": omega_dict(c.omega, names),
                "scores": {n: s.to_dict() for n, s in scorer.scores(c).items()},
                "objective": c.objective,
                "forward_equivalents": c.forward_equivalents,
                **({"grad": np.asarray(c.grad).tolist()} if c.grad is not None else {}),
            }
            for i, c in enumerate(result.candidates)
        ],
    }
    storage.makedirs(out_dir.parent)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        if jax.process_index() == 0:
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=["index", *rows[0]])
            writer.writeheader()
            writer.writerows({"index": i, **r} for i, r in enumerate(rows))
            (tmp / "candidates.csv").write_text(text.getvalue())
            (tmp / "candidates.json").write_text(json.dumps(table, indent=2) + "\n")
            (tmp / "chosen.json").write_text(json.dumps(chosen, indent=2) + "\n")
            if not plot_search(result, tmp / "search.png") and progress is not None:
                progress("search: matplotlib is not installed; search.png skipped")
    return out_dir


def save_merged_model(result: SearchResult, scorer: MergeScorer, base: Model, out: Path) -> Path:
    """Θ + Σ ω_i ΔΘ_i for the chosen ω as a dem-jax model directory (atomic; replaces
    an earlier one only once complete)."""
    best = result.best
    metadata = {
        **base.metadata,
        "dem": {
            "distributions": result.names,
            "omega": omega_dict(best.omega, result.names),
            "objective": result.objective,
            "objective_value": best.objective,
        },
    }
    merged = Model(
        base.config, scorer.merged_params(best.omega), base.hf_config, base.assets_dir, metadata
    )
    storage.makedirs(out.parent)
    return save_model(merged, out, format="orbax", overwrite=True)
