"""Fisher-weighted merging (Matena & Raffel, *Merging Models with Fisher-Weighted
Averaging*, NeurIPS 2022).

Each fine-tuned model i gets a diagonal Fisher F_i, and the merge is the
per-parameter precision-weighted mean

    θ* = Σ_i w_i F_i ⊙ θ_i / Σ_i w_i F_i        (elementwise, w_i ≥ 0 model weights)

the maximiser of Σ_i w_i log p(θ | θ_i, F_i) under the Laplace (Gaussian)
approximation of each model's posterior.

Fisher definition used here — the *empirical* Fisher, per example:

    F = (1/N) Σ_{n=1..N} (∇_θ log p_θ(y_n | x_n))²

with one example n = one row of :mod:`dem_jax.data.packing` that has at least
one loss token, and log p_θ(y_n | x_n) = Σ_{t: loss_mask} log p_θ(y_t | y_<t)
the log-likelihood of the row's *observed* targets. The paper's Fisher takes
the expectation over y ~ p_θ(y | x) (exact for a classifier's few labels); over
a language model's label *sequences* that expectation is intractable, so this
is the empirical Fisher, the data's own y.
Build rows with ``packing=False`` (as :func:`dem_jax.data.batches.encode_records`
does by default) so a row is one document; a packed row's documents count as
one example, and a document longer than a row counts as one example per piece.
Rows without loss tokens (padding rows from :func:`dem_jax.data.batches.pad_batches`)
are not counted.

Whole-model use: ``dem-jax merge`` with ``merge_method: fisher`` (a dem-jax
extension of mergekit's YAML, see :mod:`dem_jax.merge.request`) and the
pipeline's ``fisher`` baseline, both through :mod:`dem_jax.merge.with_data`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dem_jax.errors import DemError
from dem_jax.lazy import LazyModule, jax, jnp, lazy_jit
from dem_jax.merge.method import DataMergeMethod, ParamSpec, weight

# the model and shardings only when statistics are computed
losses = LazyModule("dem_jax.model.losses")
transformer = LazyModule("dem_jax.model.transformer")
placement = LazyModule("dem_jax.sharding.placement")
rules = LazyModule("dem_jax.sharding.rules")

if TYPE_CHECKING:
    from jax.sharding import Mesh

# Matena & Raffel's released code floors every Fisher at 1e-6 (``fisher_floor``).
DEFAULT_FISHER_FLOOR = 1e-6


def _row_loglik(params, config, row):
    """log p(y | x) of one row's loss tokens (a scalar)."""
    logits = transformer.apply(
        params,
        config,
        row["tokens"][None],
        positions=row["positions"][None],
        segment_ids=row["segment_ids"][None],
    )
    nll, _ = losses.masked_nll_sum(logits, row["targets"][None], row["loss_mask"][None])
    return -nll


def _fisher_batch(params, config, batch, rows_per_step):
    """(Σ over rows of (∇ log p(row))², number of rows with loss tokens) for one batch.

    Per-row gradients are taken ``rows_per_step`` at a time (vmap) inside a
    scan, and squared and summed into a float32 accumulator at once, so memory
    is the parameters plus ``rows_per_step`` gradients whatever the batch size.
    Step s takes rows s, s + B/r, s + 2B/r, ...: on a mesh the batch is split
    into contiguous blocks over the data-parallel axes, so the vmapped rows of
    one step lie on different devices and run in parallel.
    """
    b = batch["tokens"].shape[0]
    chunks = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(rows_per_step, b // rows_per_step, *x.shape[1:]), 0, 1),
        batch,
    )  # (B/r steps, r rows, T)
    grad_row = jax.grad(_row_loglik)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def step(acc, chunk):
        grads = jax.vmap(lambda row: grad_row(params, config, row))(chunk)
        sq = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)
        return jax.tree.map(jnp.add, acc, sq), None

    total, _ = jax.lax.scan(step, zeros, chunks)
    count = jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=-1).astype(jnp.float32))
    return total, count


@functools.lru_cache(maxsize=16)
def _fisher_fn(config, rows_per_step: int, mesh: Mesh | None):
    """The jitted batch pass; on a mesh the Fisher sums come out sharded like the params."""
    fn = functools.partial(_fisher_batch, config=config, rows_per_step=rows_per_step)
    if mesh is None:
        return jax.jit(fn)
    out = (
        rules.param_shardings(config, mesh),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
    return jax.jit(fn, out_shardings=out)


def diagonal_fisher(
    params: Any,
    config,
    batches: Iterable[Mapping[str, Any]],
    rows_per_step: int | None = None,
    mesh: Mesh | None = None,
) -> Any:
    """Diagonal empirical Fisher of ``params`` on ``batches``, shaped like the params.

        F = (1/N) Σ_n (∇_θ Σ_{t ∈ loss tokens of row n} log p_θ(y_t | y_<t))²

    N = rows with at least one loss token (see the module docstring for what an
    example is). float32 whatever the parameter dtype. ``rows_per_step`` rows'
    gradients are held at once (must divide the batch size; default 1, or the
    mesh's data-parallel size): raise it for speed, keep it small for memory.

    With ``mesh`` (:func:`dem_jax.sharding.rules.make_mesh`) the parameters are placed
    on :func:`~dem_jax.sharding.rules.param_shardings`, each batch is split over the
    data-parallel axes (the batch size must divide by data*fsdp*expert) and the Fisher
    comes back sharded like the parameters; the numbers are those of the
    single-device pass up to summation order. Raises DemError when no row has a
    loss token.
    """

    if rows_per_step is None:
        rows_per_step = placement.data_parallel_size(mesh)
    fn = _fisher_fn(config, rows_per_step, mesh)
    params = placement.place_params(params, config, mesh)
    total, count = None, 0.0
    for batch in batches:
        b = len(batch["tokens"])
        if mesh is not None:
            placement.check_batch_size(b, mesh, "batch size")
        if rows_per_step < 1 or b % rows_per_step:
            raise DemError(f"rows_per_step ({rows_per_step}) must divide the batch size ({b})")
        part, n = fn(params, batch=placement.place_batch(batch, mesh))
        # Sums stay on the device (no sync per batch), so batch b+1 is queued while b runs.
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        count = count + n
    if total is None or not float(count):
        raise DemError("diagonal_fisher: no rows with loss tokens")
    return jax.tree.map(lambda t: t / count, total)


@lazy_jit
def _fisher_merge_leaf(thetas, fishers, weights, floor):
    num = jnp.zeros(thetas[0].shape, jnp.float32)
    den = jnp.zeros(thetas[0].shape, jnp.float32)
    for theta, fisher, w in zip(thetas, fishers, weights, strict=True):
        f = w * jnp.maximum(fisher.astype(jnp.float32), floor)
        num = num + f * theta.astype(jnp.float32)
        den = den + f
    return num / den


def fisher_merge(
    params_list: Sequence[Any],
    fishers: Sequence[Any],
    weights: Sequence[float] | None = None,
    eps: float = DEFAULT_FISHER_FLOOR,
) -> Any:
    """Fisher-weighted average θ* = Σ_i w_i F̂_i θ_i / Σ_i w_i F̂_i, leaf by leaf, elementwise.

    F̂_i = max(F_i, eps): every Fisher is floored at ``eps`` (> 0), as in the
    authors' code. Why: where every model's Fisher is ~0 (a parameter no
    example's gradient touched, e.g. embeddings of unseen tokens) the ratio is
    0/0; with the floor it becomes Σ w_i θ_i / Σ w_i, the plain weighted
    average, and a parameter with F = 0 in one model but not in others takes
    (almost) the others' values. Equal Fishers give exactly the weighted
    average. ``weights`` (default all 1) are the paper's per-model λ_i. Returns
    float32 leaves (cast to the storage dtype as needed).
    """
    n = len(params_list)
    if n == 0 or len(fishers) != n:
        raise DemError(f"fisher_merge: {n} models and {len(fishers)} Fishers")
    if eps <= 0:
        raise DemError(f"fisher_merge: eps must be > 0, got {eps}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or min(w) < 0 or sum(w) == 0:
        raise DemError(f"fisher_merge: need {n} non-negative weights, not all zero; got {w}")
    weights_arr = jnp.asarray(w, jnp.float32)
    return jax.tree.map(
        lambda *leaves: _fisher_merge_leaf(
            leaves[:n], leaves[n:], tuple(weights_arr), jnp.float32(eps)
        ),
        *params_list,
        *fishers,
    )


@dataclass(frozen=True, kw_only=True)
class Fisher(DataMergeMethod):
    """Fisher-weighted averaging of the fine-tunes (dem-jax extension of MERGE.yaml)."""

    def check_scalars(self, per_model: list[dict[str, Any]], shared: dict[str, Any]) -> None:
        """The floor must be positive and some model must carry weight."""
        if shared["fisher_floor"] <= 0:
            raise DemError(f"parameters: fisher_floor must be > 0, got {shared['fisher_floor']}")
        if not any(v["weight"] > 0 for v in per_model):
            raise DemError("parameters: fisher needs at least one model with weight > 0")

    def merge_models(self, params_list, config, batches, mesh, per_model, shared):
        """Each model's diagonal Fisher on its own data, then the weighted average."""
        pairs = zip(params_list, batches, strict=True)
        fishers = [diagonal_fisher(p, config, b, mesh=mesh) for p, b in pairs]
        weights = [v["weight"] for v in per_model]
        return fisher_merge(params_list, fishers, weights, shared["fisher_floor"])


METHODS = (
    Fisher(
        name="fisher",
        params=(
            weight(1.0, 0.0),
            ParamSpec("fisher_floor", float, False, DEFAULT_FISHER_FLOOR, 0.0),
        ),
    ),
)
