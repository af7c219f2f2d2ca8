"""Weight search cost: the gradient strategy against the paper's grid, same run.

    python bench/bench_search.py [--quick]

Setup (built here in seconds, no files): three synthetic distributions,
each a random sparse bigram Markov chain over a 64-token vocabulary. A small
Llama (2 layers, width 64) is pretrained briefly on their mixture (the
base Θ), then fine-tuned from Θ on each distribution alone with a few Adam
steps (Θ_i), which gives real distribution vectors ΔΘ_i = Θ_i − Θ whose
merge has a curved landscape with interference between distributions; a
random direction would give a nearly flat one. Each distribution's
validation split is held-out sequences from its own chain.

Cost unit: one forward pass over all validation sets (a "forward-
equivalent"). A grid candidate costs 1; a gradient step costs 3, counting
the backward pass as 2 forwards. The gradient strategy (Adam on ω from
ω = init) is charged up to the first step whose objective is at most the
grid's best. Also printed: the per-layer variant, which can go below the
grid's best because it has more freedom.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import dem_jax
from dem_jax.config.run import SearchConfig
from dem_jax.data.batches import EncodedSet
from dem_jax.data.packing import make_rows, stack_rows
from dem_jax.data.tokenize import Encoding
from dem_jax.model.losses import batch_nll
from dem_jax.model.transformer import init_params
from dem_jax.search.scorer import MergeScorer
from dem_jax.search.strategies import run_search

VOCAB, SEQ_LEN, NAMES = 64, 32, ("alpha", "beta", "gamma")
TRAIN_ROWS = 4096  # per distribution: enough that nothing is seen twice
BASE_STEPS, BASE_LR = 600, 3e-3
FINETUNE_STEPS, FINETUNE_LR = 40, 3e-4


def markov_chain(rng: np.random.Generator) -> np.ndarray:
    """A sparse random bigram transition matrix (each token has 4 likely successors)."""
    probs = np.full((VOCAB, VOCAB), 1e-3)
    for t in range(VOCAB):
        probs[t, rng.choice(VOCAB, 4, replace=False)] += rng.dirichlet(np.ones(4))
    return probs / probs.sum(axis=1, keepdims=True)


def sample_rows(chain: np.ndarray, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` full rows of SEQ_LEN targets drawn from ``chain`` (all rows at once)."""
    cdf = np.cumsum(chain, axis=1)
    seqs = np.empty((n, SEQ_LEN + 1), np.int32)
    seqs[:, 0] = rng.integers(VOCAB, size=n)
    for t in range(SEQ_LEN):
        u = rng.random((n, 1))
        seqs[:, t + 1] = np.minimum((u > cdf[seqs[:, t]]).sum(axis=1), VOCAB - 1)
    docs = [Encoding(seq, np.ones(SEQ_LEN + 1, bool)) for seq in seqs]
    return make_rows(docs, SEQ_LEN, packing=False)


def make_trainer(config, lr: float):
    """A jitted Adam step on the mean NLL of a batch (compiled once, reused for every run)."""
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            nll, count = batch_nll(p, config, batch)
            return nll / count

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def train(params, rows, steps: int, seed: int):
        opt_state, rng = tx.init(params), np.random.default_rng(seed)
        for _ in range(steps):
            batch = stack_rows([rows[i] for i in rng.integers(len(rows), size=16)])
            params, opt_state = step(params, opt_state, batch)
        return params

    return train


def build(quick: bool):
    """Base parameters, distribution vectors and validation sets."""
    rng = np.random.default_rng(0)
    config = dem_jax.ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    # Half of every chain is shared (what the base learns from the mixture), half is
    # the distribution's own (what its fine-tune adds).
    shared = markov_chain(rng)
    chains = [0.5 * shared + 0.5 * markov_chain(rng) for _ in NAMES]
    train_rows = [sample_rows(c, TRAIN_ROWS, rng) for c in chains]
    val_rows = [sample_rows(c, 32 if quick else 64, rng) for c in chains]
    base = init_params(config, 0)  # eager: cheaper than compiling an init
    # The base sees the mixture long enough to learn what the chains share (token
    # frequencies, the fact of sparsity); fine-tunes then only specialise.
    mixture = [r for rows in train_rows for r in rows]
    base = make_trainer(config, BASE_LR)(base, mixture, BASE_STEPS, seed=1)
    finetune = make_trainer(config, FINETUNE_LR)
    finetuned = [
        finetune(base, rows, FINETUNE_STEPS, seed=2 + i) for i, rows in enumerate(train_rows)
    ]
    vectors = [jax.tree.map(lambda a, b: a - b, ft, base) for ft in finetuned]
    sets = {
        n: EncodedSet(rows, sum(int(r["loss_mask"].sum()) for r in rows), 0, len(rows))
        for n, rows in zip(NAMES, val_rows, strict=True)
    }
    return config, base, vectors, sets


def first_reaching(objectives: list[float], target: float) -> int | None:
    """1-based index of the first objective <= target (None if never)."""
    hits = [i for i, v in enumerate(objectives) if v <= target + 1e-7]
    return hits[0] + 1 if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="coarser grid, fewer rows")
    args = parser.parse_args()
    start = time.perf_counter()
    config, base, vectors, sets = build(args.quick)
    setup = time.perf_counter() - start
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; setup {setup:.0f}s")

    def scorer():
        return MergeScorer(config, base, vectors, sets, batch_size=16)

    # The paper's kind of grid: the same values for every distribution.
    values = [0.0, 0.5, 1.0] if args.quick else np.linspace(0.0, 1.0, 6).round(3).tolist()
    s = scorer()
    s.evaluate(np.zeros(len(NAMES)))  # compile outside the timings
    s.forward_equivalents = 0.0
    t = time.perf_counter()
    grid = run_search(s, SearchConfig(strategy="grid", grid=values), NAMES)
    t_grid = time.perf_counter() - t
    grid_best, grid_cost = grid.best.objective, s.forward_equivalents
    base_obj = grid.candidates[0].objective  # ω = 0
    tokens = sum(e.tokens for e in sets.values())
    print(f"[search] {len(NAMES)} distributions, validation {tokens} tokens")
    print(f"  base (ω = 0) objective          {base_obj:.4f}")
    print(
        f"  grid {len(values)}^{len(NAMES)} = {len(grid.candidates)} candidates  "
        f"best {grid_best:.4f} at ω = {np.round(grid.best.omega, 3).tolist()}, "
        f"{grid_cost:.0f} forward-equivalents, "
        f"{t_grid:.1f}s"
    )
    # Started away from the optimum on both sides: at the base (ω = 0) and at the
    # plain sum of the fine-tunes (ω = 1), so the gradient has to travel.
    for init, per_layer in ((0.0, False), (1.0, False), (0.0, True)):
        s = scorer()
        cfg = SearchConfig(
            strategy="gradient", steps=40, learning_rate=0.1, init=init, per_layer=per_layer
        )
        s.evaluate(np.full(s.omega_shape(per_layer), init), with_grad=True)  # compile
        s.forward_equivalents = 0.0
        t = time.perf_counter()
        result = run_search(s, cfg, NAMES)
        elapsed = time.perf_counter() - t
        objectives = [c.objective for c in result.candidates]
        reached = first_reaching(objectives, grid_best)
        label = f"gradient{', per layer' if per_layer else ''}, ω0 = {init:g}"
        best_omega = result.best.omega if result.best.omega.ndim == 1 else result.best.omega.mean(1)
        print(
            f"  {label:<28} best {result.best.objective:.4f} "
            f"(ω ≈ {np.round(best_omega, 3).tolist()}) after {cfg.steps} steps, {elapsed:.1f}s"
        )
        if reached is None:
            print(f"    did not reach the grid's best in {cfg.steps} steps")
            continue
        cost, t_reach = 3 * reached, elapsed * reached / cfg.steps
        step_in_evals = (elapsed / cfg.steps) / (t_grid / len(grid.candidates))
        print(
            f"    reached the grid's best at step {reached}: {cost} forward-equivalents, "
            f"ratio grid/gradient {grid_cost / cost:.1f}; wall clock {t_reach:.2f}s, "
            f"ratio {t_grid / t_reach:.1f} (a step measured {step_in_evals:.1f} candidate times)"
        )


if __name__ == "__main__":
    main()
