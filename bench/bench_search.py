"""Weight search cost: every strategy against the paper's grid, same run, two setups.

    python bench/bench_search.py [--quick] [--demo-dir DIR] [--no-demo] [--seeds N]

For each strategy (grid, random, bayes, gradient) it reports the forward-pass
equivalents needed to reach the grid's best objective within 1e-3 (TARGET_GAP),
on two setups:

* **synthetic** (built here in seconds, no files): three distributions, each a
  random sparse bigram Markov chain over a 64-token vocabulary. A small Llama
  (2 layers, width 64) is pretrained briefly on their mixture (the base Θ), then
  fine-tuned from Θ on each distribution alone with a few Adam steps (Θ_i), which
  gives real distribution vectors ΔΘ_i = Θ_i − Θ whose merge has a curved
  landscape with interference between distributions; a random direction would
  give a nearly flat one. Each distribution's validation split is held-out
  sequences from its own chain. Grid: 6 values per distribution (216 candidates).
* **demo** (`dem-jax demo`'s data, model and training settings): its base
  pretraining and its four fine-tunes are trained here (a few minutes on two
  cores; nothing else of the demo pipeline runs), or reused from ``--demo-dir``
  (an earlier `dem-jax demo --out DIR`, or this script's own earlier output),
  and the strategies run on their vectors with the demo's validation sets.
  Grid: the paper-style 5 values per distribution, 5^4 = 625 candidates.

A real-model setup (a pretrained LLM and real distributions) does not exist yet:
that example is another issue's work.

Cost unit: one forward pass over all validation sets (a "forward-equivalent").
A grid, random or bayes candidate costs 1; a gradient step costs 3, counting
the backward pass as 2 forwards. Each strategy is charged up to the first
candidate (or step) whose objective is at most the grid's best + 1e-3; the
grid itself can stop nowhere early, so it is charged its whole size. Random
and bayes are run with several seeds, since one seed proves little.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
import yaml

import dem_jax
from dem_jax.config.loader import load_run_config
from dem_jax.config.run import BaseModelConfig, SearchConfig
from dem_jax.data.batches import EncodedSet
from dem_jax.data.packing import make_rows, stack_rows
from dem_jax.data.tokenize import Encoding
from dem_jax.demo.run import CONFIG_HEADER, DISTRIBUTIONS, demo_config
from dem_jax.demo.synthetic import write_char_tokenizer, write_distributions
from dem_jax.io.modeldir import DEM_METADATA
from dem_jax.io.orbax import read_metadata
from dem_jax.io.run_layout import RunLayout
from dem_jax.model.losses import batch_nll
from dem_jax.model.transformer import init_params
from dem_jax.pipeline.stages import pretrain_config
from dem_jax.search.run import build_scorer
from dem_jax.search.scorer import FORWARDS_PER_EVAL, FORWARDS_PER_GRADIENT, MergeScorer
from dem_jax.search.strategies import run_search
from dem_jax.train.loop import run_training

VOCAB, SEQ_LEN, NAMES = 64, 32, ("alpha", "beta", "gamma")
TRAIN_ROWS = 4096  # per distribution: enough that nothing is seen twice
BASE_STEPS, BASE_LR = 600, 3e-3
FINETUNE_STEPS, FINETUNE_LR = 40, 3e-4
TARGET_GAP = 1e-3  # "reached the grid's best": objective <= grid best + this


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


def demo_base(layout: RunLayout) -> Path | None:
    """A demo run's pretrained base, if it has one: models/pretrain (dem-jax 0.1.0's
    demo, and this script's own output) or a trained models/base (later demos)."""
    if layout.model("pretrain").exists():
        return layout.model("pretrain")
    base = layout.model("base")
    if (base / DEM_METADATA).exists() and "trained_on" in (
        read_metadata(base).get("metadata") or {}
    ):
        return base
    return None


def demo_scorer(demo_dir: Path | None):
    """(scorer, names): the demo's base and fine-tunes (trained here unless ``demo_dir``
    has them) as distribution vectors, the demo's validation sets and search batch size."""
    root = (demo_dir or Path(tempfile.mkdtemp(prefix="dem_bench_demo_"))).absolute()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / ".xla_cache"))
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    data = root / "data"
    if not (data / "tokenizer").exists():  # as `dem-jax demo` writes them
        write_char_tokenizer(data / "tokenizer")
        write_distributions(data, DISTRIBUTIONS, n_train=2000, n_val=100, seed=0)
    config_path = root / "config.yaml"
    if not config_path.exists():
        config_path.write_text(CONFIG_HEADER + yaml.safe_dump(demo_config(root), sort_keys=False))
    cfg = load_run_config(config_path)
    layout = RunLayout(cfg.output_dir)
    # The base as the pipeline pretrains it (dem_jax.pipeline.run), then the fine-tunes.
    pre = cfg.pipeline.pretrain
    names = sorted(cfg.data.distributions)
    pre_cfg = pretrain_config(cfg)
    quiet = lambda _: None  # noqa: E731
    t = time.perf_counter()
    base = demo_base(layout)
    if base is None:
        mixture = sorted(pre.distributions or names)
        run_training(pre_cfg, "pretrain", log=quiet, distributions=mixture)
        base = layout.model("pretrain")
    ft_cfg = dataclasses.replace(cfg, model=BaseModelConfig(path=str(base)))
    for name in names:
        run_training(ft_cfg, name, log=quiet)
    print(f"demo models in {root} ({time.perf_counter() - t:.0f}s to train or find)")
    scorer, _, names = build_scorer(ft_cfg)
    return scorer, names


def run_strategy(s: MergeScorer, cfg: SearchConfig, names, target: float) -> dict:
    """One search from a zero cost count: its best, and the cost of reaching ``target``."""
    s.forward_equivalents = 0.0
    t = time.perf_counter()
    result = run_search(s, cfg, names)
    elapsed = time.perf_counter() - t
    reached = first_reaching([c.objective for c in result.candidates], target)
    per = FORWARDS_PER_GRADIENT if cfg.strategy == "gradient" else FORWARDS_PER_EVAL
    return {
        "n": len(result.candidates),
        "cost": s.forward_equivalents,
        "best": result.best.objective,
        "reached": reached,
        "reach_cost": None if reached is None else reached * per,
        "seconds": elapsed,
    }


def compare(s: MergeScorer, names, values: list[float], budget: int, seeds: int) -> None:
    """Every strategy on scorer ``s``: a table of what each needs to reach the grid's best."""
    s.evaluate(np.zeros(len(names)))  # compile both programs outside the timings
    s.evaluate(np.zeros(len(names)), with_grad=True)
    grid_cfg = SearchConfig(strategy="grid", grid=values)
    grid = run_strategy(s, grid_cfg, names, np.inf)
    target = grid["best"] + TARGET_GAP
    grid.update(reached=grid["n"], reach_cost=grid["cost"])  # it cannot stop early
    base = s.evaluate(np.zeros(len(names))).objective
    print(f"  base (ω = 0) objective {base:.4f}; grid best {grid['best']:.4f}, target {target:.4f}")
    runs = [(f"grid {len(values)}^{len(names)}", [grid])]
    for strategy in ("random", "bayes"):
        cfgs = [
            SearchConfig(strategy=strategy, grid=values, samples=budget, seed=seed)
            for seed in range(seeds)
        ]
        label = f"{strategy}, {seeds} seed{'s' if seeds > 1 else ''}"
        runs.append((label, [run_strategy(s, cfg, names, target) for cfg in cfgs]))
    for init, lr, per_layer in ((0.5, 0.05, False), (0.0, 0.1, False), (1.0, 0.1, False),
                                (0.0, 0.1, True)):  # fmt: skip
        cfg = SearchConfig(
            strategy="gradient", steps=40, learning_rate=lr, init=init, per_layer=per_layer
        )
        label = f"gradient ω0={init:g} lr={lr:g}{' per-layer' if per_layer else ''}"
        runs.append((label, [run_strategy(s, cfg, names, target)]))
    print_table(runs, grid["cost"])


def _spread(values: list[float], fmt: str) -> str:
    """The median, and [min, max] when there are several values."""
    med = format(float(np.median(values)), fmt)
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def print_table(runs: list[tuple[str, list[dict]]], grid_cost: float) -> None:
    """One Markdown row per strategy; over seeds: the median [min, max] of those that
    reached the target, and how many did."""
    head = (
        "strategy", "runs", "budget (fwd-eq)", "best objective", "reached",
        "fwd-equiv to reach", "grid / that", "wall s to reach",
    )  # fmt: skip
    print("  | " + " | ".join(head) + " |")
    print("  |" + "|".join("---" for _ in head) + "|")
    for label, results in runs:
        hits = [r for r in results if r["reached"] is not None]
        cost = [r["reach_cost"] for r in hits]
        wall = [r["seconds"] * r["reached"] / r["n"] for r in hits]
        row = (
            label,
            str(len(results)),
            f"{results[0]['n']} ({results[0]['cost']:g})",
            _spread([r["best"] for r in results], ".4f"),
            f"{len(hits)}/{len(results)}",
            _spread(cost, "g") if hits else "never",
            f"{grid_cost / float(np.median(cost)):.1f}x" if hits else "-",
            _spread(wall, ".1f") if hits else "-",
        )
        print("  | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="coarser grid, fewer rows")
    parser.add_argument("--demo-dir", type=Path, help="reuse (or keep) the demo's models here")
    parser.add_argument("--no-demo", action="store_true", help="the synthetic setup only")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for random and bayes")
    args = parser.parse_args()
    start = time.perf_counter()
    config, base, vectors, sets = build(args.quick)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"synthetic setup built in {time.perf_counter() - start:.0f}s")
    tokens = sum(e.tokens for e in sets.values())
    print(f"[synthetic] {len(NAMES)} distributions, validation {tokens} tokens")
    values = [0.0, 0.5, 1.0] if args.quick else np.linspace(0.0, 1.0, 6).round(3).tolist()
    s = MergeScorer(config, base, vectors, sets, batch_size=16)
    compare(s, NAMES, values, budget=64, seeds=args.seeds)
    if args.no_demo:
        return
    s, names = demo_scorer(args.demo_dir)
    print(f"[demo] {len(names)} distributions ({', '.join(names)})")
    values = [0.0, 0.5, 1.0] if args.quick else [0.0, 0.25, 0.5, 0.75, 1.0]
    compare(s, names, values, budget=128, seeds=args.seeds)


if __name__ == "__main__":
    main()
