"""Training speed and memory on a real model, against a plain PyTorch loop, in one run.

    python bench/bench_train.py [--quick] [--json OUT.json]

Model: SmolLM2-135M-Instruct (``dem_jax.demo.smollm2.smollm2_dir()``, float32 Llama,
30 layers, width 576, tied 49152-token embedding), batch 4 x 256 of real text (the
Python standard library's own source files, tokenised by the model's tokenizer and
packed as ``dem-jax train`` packs them). Every measurement runs in a process of its
own, one after the other, so each peak RSS (``ru_maxrss``) is that process's alone:

1. ``torch``: transformers ``LlamaForCausalLM`` + ``torch.optim.AdamW`` (betas 0.9/0.95,
   grad clip 1.0), float32, ``torch.set_num_threads(cpu_count)``. The baseline; run at
   the start and again at the end of the benchmark (the faster run is the baseline, so
   a load spike cannot flatter dem-jax).
2. ``matmul``: jitted float32 matmuls of the model's own shapes (every projection's
   forward ``x @ W`` and its two backward products, weighted by FLOPs, the vocabulary
   projection included), and a 2048^3 one: what this CPU, in this run, does at best.
3. ``step``: the bare jitted dem-jax train step (``jit_train_step``: donated state,
   chunked cross-entropy, AdamW, clipping) on the same batches; FLOP/s from
   ``dem_jax.model.flops.train_flops`` as a fraction of (2); XLA's memory analysis.
4. ``train``: ``dem-jax train`` end to end as a subprocess (data loading and
   tokenisation, steps, a mid-run evaluation and checkpoint, the final evaluation,
   checkpoint and model export). Steady-state tokens/s comes from its metrics.jsonl:
   (last step - step 1) x tokens per step / (time of the last train record - time of
   step 1's), so compilation is out and the mid-run evaluation and checkpoint are in;
   wall tokens/s is steps x tokens per step / the whole process's wall time.
5. (3) and (4) again with ``train.compute_dtype=bfloat16`` (float32 master weights).

Memory budget printed beside each peak RSS: parameters + gradients + two AdamW moments,
all float32 (16 bytes per parameter), plus the activations one step keeps for its
backward pass as ``dem_jax.plan.memory.activation_bytes`` counts them for the code
installed (each layer's input and weight-matmul outputs, one layer's intermediates in
flight, the chunked loss head; ``tests/test_plan.py`` checks that count against XLA's
buffer assignment). The goal is RSS <= 1.3 x state + activations; the interpreter and
its libraries (~0.55 GB with torch, which transformers imports) are not in the budget.

The machine these run on is shared: each row says the load average during it, and
since wall-clock rates taken minutes apart under a changing load are not comparable,
each rate is also given per CPU-second (user + system time of the process over the
same steps), which depends much less on how many other jobs share the cores.

    --only torch,matmul,step,train,bf16   any subset (the matmul always runs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ProcessSampler, cpu_seconds, peak_rss, real_batches, write_text_data

BATCH, SEQ = 4, 256
LR = 3e-4
RESULT = "RESULT "  # prefix of a child's one JSON line on stdout


# ---------------------------------------------------------------- shared helpers


def emit(result: dict) -> None:
    result["peak_rss"] = peak_rss()
    result["load"] = os.getloadavg()[0]
    print(RESULT + json.dumps(result), flush=True)


def timed_steps(fn, warmup: int, steps: int) -> dict[str, float]:
    """``fn(i)`` for ``warmup`` then ``steps`` steps: the warmup's seconds, and the timed
    steps' mean wall seconds, fastest wall seconds and mean CPU seconds."""
    start = time.perf_counter()
    for i in range(warmup):
        fn(i)
    first = time.perf_counter() - start
    times, cpu = [], cpu_seconds()
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    cpu = (cpu_seconds() - cpu) / steps
    return {
        "first_s": first,
        "step_s": sum(times) / steps,
        "best_s": min(times),
        "cpu_s": cpu,
    }


# ---------------------------------------------------------------- children


def child_torch(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from dem_jax.demo.smollm2 import smollm2_dir

    torch.set_num_threads(os.cpu_count() or 1)
    batches = real_batches(Path(args.data), 4, BATCH, SEQ)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    tensors = []
    for b in batches:
        labels = torch.tensor(b["targets"], dtype=torch.long)
        labels[torch.tensor(b["loss_mask"]) == 0] = -100
        tensors.append((torch.tensor(b["tokens"], dtype=torch.long), labels))

    def step(i):
        input_ids, labels = tensors[i % len(tensors)]
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    emit({"kind": "torch", **timed_steps(step, 1, args.steps)})


def _matmul_shapes(c) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count per step) of every matmul of one forward pass of the model, the
    output projection included, and of its two backward products (dx, dW)."""
    tokens, d, f, v = BATCH * SEQ, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    forward = [(d, q, 1), (d, kv, 2), (q, d, 1), (d, f, 2), (f, d, 1)]
    forward = [(k, n, count * c.num_layers) for k, n, count in forward] + [(d, v, 1)]
    shapes = []
    for k, n, count in forward:
        shapes += [(tokens, k, n, count), (tokens, n, k, count), (k, tokens, n, count)]
    return shapes


def child_matmul(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dem_jax.demo.smollm2 import smollm2_dir
    from dem_jax.io.models import read_model_config

    config = read_model_config(smollm2_dir())
    rng = np.random.default_rng(0)
    repeats = 3 if args.quick else 6
    mm = jax.jit(lambda a, b: a @ b)

    def rate(m, k, n, dtype) -> tuple[float, float]:
        """(FLOP per wall second, FLOP per CPU second), each the best of ``repeats``."""
        a = jnp.asarray(rng.standard_normal((m, k)), dtype)
        b = jnp.asarray(rng.standard_normal((k, n)), dtype)
        mm(a, b).block_until_ready()
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), cpu_seconds()
            mm(a, b).block_until_ready()
            walls.append(time.perf_counter() - wall)
            cpus.append(cpu_seconds() - cpu)
        return 2 * m * k * n / min(walls), 2 * m * k * n / max(min(cpus), 1e-6)

    out = {"kind": "matmul"}
    for dtype in ("float32", "bfloat16"):
        flops = wall = cpu = 0.0
        for m, k, n, count in _matmul_shapes(config):
            work = 2 * m * k * n * count
            per_wall, per_cpu = rate(m, k, n, dtype)
            flops, wall, cpu = (
                flops + work,
                wall + work / per_wall,
                cpu + work / per_cpu,
            )
        out[f"model_shapes_{dtype}"] = flops / wall
        out[f"model_shapes_{dtype}_per_cpu_s"] = flops / cpu
    out["square_2048_float32"] = rate(2048, 2048, 2048, "float32")[0]
    emit(out)


def child_step(args) -> None:
    import jax
    import jax.numpy as jnp

    from dem_jax.config.run import TrainConfig
    from dem_jax.demo.smollm2 import smollm2_dir
    from dem_jax.io.models import load_model
    from dem_jax.model.flops import train_flops
    from dem_jax.train.optimizer import make_optimizer
    from dem_jax.train.step import init_state, jit_train_step

    numpy_batches = real_batches(Path(args.data), 4, BATCH, SEQ)
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in numpy_batches]
    model = load_model(smollm2_dir())
    config = model.config.replace(dtype=args.dtype)
    tx = make_optimizer(TrainConfig(steps=1000, warmup_steps=0, learning_rate=LR))
    holder = {"state": init_state(model.params, tx)}
    del model  # as the trainer should: the state holds the only copy of the parameters
    step = jit_train_step(holder["state"], config=config, tx=tx)
    analysis = step.lower(holder["state"], batches[0]).compile().memory_analysis()

    def run(i):
        holder["state"], metrics = step(holder["state"], batches[i % len(batches)])
        jax.block_until_ready(metrics)

    emit(
        {
            "kind": f"step_{args.dtype}",
            **timed_steps(run, 1, args.steps),
            "flops_per_step": train_flops(config, BATCH, SEQ),
            "xla_temp_bytes": analysis.temp_size_in_bytes,
            "xla_argument_bytes": analysis.argument_size_in_bytes,
            "live_bytes": sum(x.nbytes for x in jax.live_arrays()),
        }
    )


CHILDREN = {"torch": child_torch, "matmul": child_matmul, "step": child_step}


# ---------------------------------------------------------------- the parent


def run_child(kind: str, args, **extra) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--data", str(args.data_file)]
    argv += ["--steps", str(args.bare_steps)] + (["--quick"] if args.quick else [])
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    print(f"  running {kind} {extra or ''} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {kind} failed with status {proc.returncode}")
    return json.loads(lines[-1][len(RESULT) :])


def run_train(args, dtype: str, smollm: Path) -> dict:
    """``dem-jax train`` as a subprocess: its timings, metrics and peak RSS."""
    out = Path(tempfile.mkdtemp(prefix=f"bench_train_{dtype}_", dir=args.work))
    steps = args.train_steps
    half = max(1, steps // 2)
    config = {
        "output_dir": str(out),
        "model": {"path": str(smollm)},
        "data": {
            "seq_len": SEQ,
            "packing": True,
            "distributions": {
                "text": {"train": str(args.data_file), "validation": str(args.val_file)}
            },
        },
        "train": {
            "steps": steps,
            "batch_size": BATCH,
            "learning_rate": LR,
            "warmup_steps": 2,
            "compute_dtype": dtype,
            "eval_every": half,
            "eval_batches": 2,
            "log_every": 1,
            "checkpoint_every": half,
            "keep_checkpoints": 1,
        },
    }
    cfg_path = out / "run.json"  # YAML is a superset of JSON
    cfg_path.write_text(json.dumps(config))
    argv = [
        sys.executable,
        "-m",
        "dem_jax",
        "train",
        str(cfg_path),
        "--distribution",
        "text",
    ]
    print(f"  running dem-jax train ({dtype}) ...", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = ProcessSampler(proc.pid)
    sampler.start()
    log = [(time.time() - start, line.rstrip()) for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if proc.returncode:
        print("\n".join(line for _, line in log[-30:]), file=sys.stderr)
        raise SystemExit(f"dem-jax train ({dtype}) failed with status {proc.returncode}")
    records = [json.loads(x) for x in (out / "logs" / "text.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    first, last = train[0], train[-1]
    tokens_per_step = BATCH * SEQ
    steps_timed = last["step"] - first["step"]
    steady = steps_timed * tokens_per_step / (last["time"] - first["time"])
    cpu = sampler.cpu_at(last["time"]) - sampler.cpu_at(first["time"])
    peak_t = max(sampler.samples, key=lambda s: s[1])[0] - start
    during = next((line for t, line in reversed(log) if t <= peak_t), "")
    return {
        "kind": f"train_{dtype}",
        "steady_tokens_per_s": steady,
        "cpu_s": cpu / steps_timed,
        "wall_tokens_per_s": steps * tokens_per_step / wall,
        "wall_s": wall,
        "peak_rss": usage.ru_maxrss * 1024,
        "peak_at_s": peak_t,
        "peak_during": during[:100],
        "load": (load_before + os.getloadavg()[0]) / 2,
        "rss_timeline": [(round(t - start, 1), rss) for t, rss, _ in sampler.samples[::4]],
        "log": log,
    }


def budget(dtype: str, smollm: Path) -> dict:
    import math

    import jax

    from dem_jax.io.models import read_model_config
    from dem_jax.model.flops import train_flops
    from dem_jax.model.transformer import param_shapes
    from dem_jax.plan.memory import activation_bytes

    config = read_model_config(smollm)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(config)))
    state = 16 * n  # float32 params, grads, AdamW mu and nu
    acts = activation_bytes(config, BATCH, SEQ, dtype, 1, False)["total"]
    return {
        "params": n,
        "state": state,
        "activations": acts,
        "limit": 1.3 * state + acts,
        "flops_per_step": train_flops(config, BATCH, SEQ),
    }


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def report(res: dict) -> None:
    """The results table (Markdown) and notes."""
    import jax
    import torch

    tokens = BATCH * SEQ
    torch_runs = res["torch"]
    base = max(tokens / r["step_s"] for r in torch_runs)
    base_cpu = max(tokens / r["cpu_s"] for r in torch_runs)
    mm = res["matmul"]
    peak, peak_cpu = mm["model_shapes_float32"], mm["model_shapes_float32_per_cpu_s"]
    flops_per_token = res["budget"]["float32"]["flops_per_step"] / tokens
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} cores; "
        f"SmolLM2-135M ({res['budget']['float32']['params'] / 1e6:.1f}M parameters), "
        f"batch {BATCH} x {SEQ}, {flops_per_token * tokens / 1e9:.0f} GFLOP per train step"
    )
    print(
        f"f32 matmul of the model's shapes: {peak / 1e9:.1f} GFLOP/s, "
        f"{peak_cpu / 1e9:.1f} GFLOP per CPU-s (2048^3: {mm['square_2048_float32'] / 1e9:.1f} "
        f"GFLOP/s; bf16 model shapes {mm['model_shapes_bfloat16'] / 1e9:.1f} GFLOP/s); "
        f"load {mm['load']:.1f}"
    )
    print(
        "PyTorch runs: "
        + ", ".join(
            f"{tokens / r['step_s']:.1f} tokens/s, {tokens / r['cpu_s']:.1f} per CPU-s "
            f"(load {r['load']:.1f})"
            for r in torch_runs
        )
        + "; the baseline is the faster of each"
    )
    print()
    print(
        "| run | tokens/s | vs PyTorch | tokens/CPU-s | vs PyTorch | FLOP/s / matmul's "
        "| per CPU-s / matmul's | peak RSS GB | budget GB: state + act | RSS / budget "
        "| RSS <= 1.3 state + act | load |"
    )
    print("|" + "---|" * 12)

    def row(name, tps, cpu_s, rss, dtype, load):
        b = res["budget"][dtype]
        total = b["state"] + b["activations"]
        per_cpu = tokens / cpu_s
        ok = "yes" if rss <= b["limit"] else f"no (limit {gb(b['limit'])})"
        print(
            f"| {name} | {tps:.1f} | {tps / base:.2f} | {per_cpu:.1f} | {per_cpu / base_cpu:.2f} "
            f"| {tps * flops_per_token / peak:.0%} | {per_cpu * flops_per_token / peak_cpu:.0%} "
            f"| {gb(rss)} | {gb(total)} = {gb(b['state'])} + {gb(b['activations'])} "
            f"| {rss / total:.2f} | {ok} | {load:.1f} |"
        )

    for r in torch_runs:
        row(
            "PyTorch loop, f32",
            tokens / r["step_s"],
            r["cpu_s"],
            r["peak_rss"],
            "float32",
            r["load"],
        )
    for dtype in ("float32", "bfloat16"):
        s = res.get(f"step_{dtype}")
        if s:
            name = f"dem-jax bare step, {dtype}"
            row(name, tokens / s["step_s"], s["cpu_s"], s["peak_rss"], dtype, s["load"])
        t = res.get(f"train_{dtype}")
        if t:
            name = f"`dem-jax train` {dtype}, steady state"
            row(
                name,
                t["steady_tokens_per_s"],
                t["cpu_s"],
                t["peak_rss"],
                dtype,
                t["load"],
            )
            print(
                f"| `dem-jax train` {dtype}, whole process ({t['wall_s']:.0f} s) "
                f"| {t['wall_tokens_per_s']:.1f} | {t['wall_tokens_per_s'] / base:.2f} "
                "| | | | | | | | | |"
            )
    print()
    for dtype in ("float32", "bfloat16"):
        s, t = res.get(f"step_{dtype}"), res.get(f"train_{dtype}")
        if s:
            print(
                f"bare step {dtype}: XLA temporaries {gb(s['xla_temp_bytes'])} GB (gradients "
                f"included), arguments {gb(s['xla_argument_bytes'])} GB; first step with "
                f"compilation {s['first_s']:.0f} s; fastest step {tokens / s['best_s']:.1f} "
                "tokens/s"
            )
        if t:
            print(
                f"dem-jax train {dtype}: peak RSS {t['peak_at_s']:.0f} s into {t['wall_s']:.0f} s,"
                f" after the line {t['peak_during']!r}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset: torch,matmul,step,train,bf16",
    )
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](args)
        return

    from dem_jax.demo.smollm2 import smollm2_dir

    smollm = smollm2_dir()
    args.bare_steps = 2 if args.quick else 4
    args.train_steps = 4 if args.quick else 8
    only = set(args.only.split(",")) if args.only else {"torch", "matmul", "step", "train", "bf16"}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        args.work = work
        # Enough text for the steps (and the baselines' batches) at ~3.5 characters a token.
        args.data_file, args.val_file = write_text_data(Path(work) / "data", 400_000)
        res: dict = {
            "torch": [],
            "budget": {d: budget(d, smollm) for d in ("float32", "bfloat16")},
        }
        if "torch" in only:
            res["torch"].append(run_child("torch", args))
        if "matmul" in only or not res.get("matmul"):
            res["matmul"] = run_child("matmul", args)
        dtypes = ["float32"] + (["bfloat16"] if "bf16" in only else [])
        for dtype in dtypes:
            if "step" in only:
                res[f"step_{dtype}"] = run_child("step", args, dtype=dtype)
            if "train" in only:
                res[f"train_{dtype}"] = run_train(args, dtype, smollm)
        if "torch" in only and not args.quick:
            res["torch"].append(run_child("torch", args))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if not res["torch"]:  # a partial run (--only): the raw numbers, without the logs
        brief = {k: v for k, v in res.items() if k != "budget"}
        for v in brief.values():
            if isinstance(v, dict):
                v.pop("log", None), v.pop("rss_timeline", None)
        print(json.dumps(brief, indent=1))
        return
    report(res)


if __name__ == "__main__":
    main()
