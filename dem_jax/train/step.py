"""Pure, jitted training and evaluation steps.

The train state is a plain dict pytree ``{"params", "opt_state", "step"}``,
sharded like the parameters (optimizer moments follow their parameter) and
donated to each step so the update happens in place.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dem_jax.config.model import ModelConfig
from dem_jax.model.losses import batch_nll


def init_state(
    params: dict[str, Any], tx: optax.GradientTransformation, donate: bool = False
) -> dict[str, Any]:
    """A fresh train state whose optimizer moments are sharded like their parameters
    (left to propagation, XLA would replicate them: a full copy per device).

    With ``donate`` the state takes over ``params``' buffers (they are deleted) instead
    of copying them: the trainer's only copy of the weights is then the state's.
    """
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = _replicated_like(jax.tree.leaves(param_shardings)[0])
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
    init = jax.jit(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.int32(0)},
        out_shardings=shardings,
        donate_argnums=0 if donate else (),
    )
    return init(params)


def _replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """A fully replicated sharding over the same devices."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def _micro_batches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """(B, T) -> (accum, B / accum, T), keeping each device's rows on that device."""

    def split(x):
        b = x.shape[0]
        return x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def train_step(state, batch, *, config: ModelConfig, tx, accum: int = 1):
    """One optimizer step on a global batch; returns (new state, metrics).

    The loss is the token-weighted mean NLL over the whole batch, also with
    gradient accumulation (micro-batch sums are added before dividing), so
    accumulation changes memory, not the maths.
    """
    params = state["params"]

    def summed_loss(p, micro):
        total, count = batch_nll(p, config, micro)
        return total, count

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    if accum == 1:
        (total, count), grads = grad_fn(params, batch)
    else:

        def accumulate(carry, micro):
            (total, count), grads = grad_fn(params, micro)
            c_total, c_count, c_grads = carry
            return (c_total + total, c_count + count, jax.tree.map(jnp.add, c_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (total, count, grads), _ = jax.lax.scan(
            accumulate, (jnp.float32(0), jnp.float32(0), zeros), _micro_batches(batch, accum)
        )
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": total / denom,
        "tokens": count,
        "grad_norm": optax.tree.norm(grads),
    }
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def jit_train_step(state, *, config: ModelConfig, tx, accum: int = 1):
    """:func:`train_step` jitted with ``state`` donated and the new state pinned to
    ``state``'s shardings. Left to XLA, outputs come back with equivalent but unequal
    shardings (``P()`` for ``P(None, None)``), and the second step compiles again."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    replicated = _replicated_like(jax.tree.leaves(shardings)[0])
    step = functools.partial(train_step, config=config, tx=tx, accum=accum)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, replicated))


def eval_step(params, batch, *, config: ModelConfig):
    """(summed NLL, token count) of a batch."""
    return batch_nll(params, config, batch)


def first_nonfinite(watch: dict[str, jax.Array], step, metrics) -> dict[str, jax.Array]:
    """Remember the first step whose loss or gradient norm was NaN or inf, and those
    values (``watch["step"]`` 0: none yet). Runs on device after every step, so
    spotting divergence costs no host round trip; the loop reads it when it syncs."""
    loss, grad_norm = metrics["loss"], metrics["grad_norm"]
    first = (watch["step"] == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return {
        "step": jnp.where(first, jnp.int32(step), watch["step"]),
        "loss": jnp.where(first, loss, watch["loss"]),
        "grad_norm": jnp.where(first, grad_norm, watch["grad_norm"]),
    }


def no_nonfinite_yet() -> dict[str, jax.Array]:
    """The initial value of :func:`first_nonfinite`'s ``watch``."""
    return {"step": jnp.int32(0), "loss": jnp.float32(0), "grad_norm": jnp.float32(0)}


def all_finite(params: Any) -> jax.Array:
    """Whether every floating-point parameter is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
