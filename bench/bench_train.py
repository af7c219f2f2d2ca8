"""Training-step benchmark; ratios against baselines timed in the same run.

    python bench/bench_train.py [--quick]

1. Train-step tokens/s of dem-jax (jitted AdamW step, donated state) against a
   transformers/PyTorch training step (forward, backward, AdamW) on the same
   random Llama model, batch and dtype (float32, CPU).
2. Achieved FLOP/s of the dem-jax step (matmul FLOPs of forward + backward =
   3 x forward, attention included) as a fraction of a plain large float32
   matmul measured in the same run (this machine's practical peak).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import best_of, llama_pair

from dem_jax.config.run import TrainConfig
from dem_jax.model.flops import train_flops
from dem_jax.train.optimizer import make_optimizer
from dem_jax.train.step import init_state, jit_train_step


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    return 2 * n**3 / best_of(lambda: mm(a).block_until_ready(), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 8
    batch, length = 8, 256

    import torch

    hf, model = llama_pair(train=True)
    config = model.config
    tokens = np.random.default_rng(0).integers(0, 4096, (batch, length + 1)).astype(np.int32)

    # dem-jax: one jitted AdamW step with the state donated, as the trainer runs it.
    cfg = TrainConfig(steps=1000, warmup_steps=0, compute_dtype="float32")
    tx = make_optimizer(cfg)
    state = init_state(model.params, tx)
    step = jit_train_step(state, config=config, tx=tx)
    jbatch = {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "loss_mask": jnp.ones((batch, length), jnp.float32),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        "positions": jnp.tile(jnp.arange(length, dtype=jnp.int32), (batch, 1)),
    }
    holder = {"state": state}

    def ours():
        holder["state"], metrics = step(holder["state"], jbatch)
        jax.block_until_ready(metrics)

    # transformers: forward with labels (same shifted next-token loss), backward, AdamW.
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    input_ids = torch.tensor(tokens[:, :-1], dtype=torch.long)
    labels = torch.tensor(tokens[:, 1:], dtype=torch.long)

    def theirs():
        opt.zero_grad(set_to_none=True)
        logits = hf(input_ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    ours()
    theirs()
    t_ours, t_theirs = best_of(ours, repeats), best_of(theirs, repeats)
    n = batch * length
    peak = matmul_flops_per_s()
    achieved = train_flops(config, batch, length) / t_ours
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} cores, float32")
    print(f"[train step] Llama 4 layers, width 256, vocab 4096, batch {batch} x {length}")
    print(f"  transformers/PyTorch {n / t_theirs:9.0f} tokens/s  (baseline)")
    print(f"  dem-jax              {n / t_ours:9.0f} tokens/s  ratio {t_theirs / t_ours:.2f}")
    print("[FLOP/s]")
    print(f"  2048^3 float32 matmul   {peak / 1e9:8.1f} GFLOP/s  (baseline)")
    print(
        f"  dem-jax train step      {achieved / 1e9:8.1f} GFLOP/s  fraction {achieved / peak:.2f}"
    )


if __name__ == "__main__":
    main()
