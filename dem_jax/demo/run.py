"""``dem-jax demo``: the whole DEM pipeline on built-in data, on a CPU, in minutes.

It writes a character tokenizer and four distributions (arithmetic, string
reversal and digit sorting, whose answers are checked by exact match, and a
general-text distribution), pretrains a small Llama base on a little of
each, then runs :func:`dem_jax.pipeline.run_pipeline`: one fine-tune per
distribution, distribution vectors, a Bayesian (TPE) search of the merge
weights on validation perplexity, the data-mixing and vector-merging baselines,
evaluation, the report and a Hugging Face export.

Under ``--out``: ``data/`` (tokenizer and JSONL files), ``config.yaml`` and ``run/``,
where ``run/models/base`` is the pretrained base every fine-tune starts from (the one
to give ``dem-jax vectors --base``; ``run/models/init`` is only its random
initialisation), ``run/models/NAME`` the fine-tunes, ``run/models/dem`` the DEM model
and ``run/report/report.md`` the report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import yaml

from dem_jax.config.loader import load_run_config
from dem_jax.demo.synthetic import vocab_size, write_char_tokenizer, write_distributions
from dem_jax.errors import DemError
from dem_jax.pipeline import run_pipeline

DISTRIBUTIONS = ("arithmetic", "reverse", "sort", "text")


def demo_config(root: Path) -> dict:
    """The demo's run config (also written to ``root/config.yaml``)."""
    data = root / "data"
    return {
        "output_dir": str(root / "run"),
        "model": {
            "init": {
                "vocab_size": vocab_size(),
                "hidden_size": 96,
                "intermediate_size": 256,
                "num_layers": 3,
                "num_heads": 6,
                "num_kv_heads": 2,
                "max_position_embeddings": 128,
            }
        },
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {
            "tokenizer": str(data / "tokenizer"),
            "seq_len": 64,
            "packing": True,
            "distributions": {
                n: {
                    "train": str(data / f"{n}.train.jsonl"),
                    "validation": str(data / f"{n}.val.jsonl"),
                }
                for n in DISTRIBUTIONS
            },
        },
        "train": {
            "steps": 150,
            "batch_size": 16,
            "learning_rate": 5.0e-4,
            "warmup_steps": 10,
            "compute_dtype": "float32",
            "eval_every": 50,  # validation points on the report's training curves
            "log_every": 50,
            "checkpoint_every": 100,
        },
        # TPE over the paper-style grid's box: 48 candidates instead of the grid's 5^4 = 625
        # (`search.strategy=grid` for the paper's protocol).
        "search": {
            "strategy": "bayes",
            "grid": [0.0, 0.25, 0.5, 0.75, 1.0],
            "samples": 48,
            "batch_size": 16,
        },
        "pipeline": {
            # A base that has seen a little of everything, as a pretrained LLM has;
            # the fine-tunes then specialise it.
            "pretrain": {"steps": 300, "learning_rate": 3.0e-3},
            "mixtures": ["uniform", "size", "taskpgm"],
            "eval_max_examples": 100,
            "max_new_tokens": 10,
        },
    }


CONFIG_HEADER = "# Written by `dem-jax demo`; re-run it with `dem-jax pipeline` on this file.\n"


def check_demo_dir(root: Path) -> None:
    """DemError unless ``root`` is absent, empty, or an earlier demo's output (which the
    demo resumes): the demo writes ``data/`` and ``config.yaml`` there."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DemError(f"{root}: --out exists and is a file")
    config = root / "config.yaml"
    if any(root.iterdir()) and not (
        config.is_file() and config.read_text(errors="replace").startswith(CONFIG_HEADER)
    ):
        raise DemError(
            f"{root}: --out is a non-empty directory that is not a dem-jax demo output; "
            "choose a new or empty directory"
        )


def run_demo(out: str, log: Callable[[str], None] = print) -> int:
    """Write the demo's data and config under ``out`` and run the pipeline; ``log``
    takes the progress lines."""
    start = time.perf_counter()
    root = Path(out).absolute()
    check_demo_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    # Compiled programs are cached on disk: the many training runs share them.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / ".xla_cache"))
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    data = root / "data"
    if not (data / "tokenizer").exists():
        write_char_tokenizer(data / "tokenizer")
        write_distributions(data, DISTRIBUTIONS, n_train=2000, n_val=100, seed=0)
    config_path = root / "config.yaml"
    config_path.write_text(CONFIG_HEADER + yaml.safe_dump(demo_config(root), sort_keys=False))
    log(f"dem-jax demo: DEM on {len(DISTRIBUTIONS)} built-in distributions, in {root}")
    result = run_pipeline(load_run_config(config_path), log=log)
    print(result.summary)
    dem = result.result["dem"]
    print("\nDEM weights: " + ", ".join(f"{n}={w}" for n, w in dem["omega"].items()))
    cost = result.result["cost"]
    search = cost["mixing_search"]
    print(
        f"FLOPs: DEM {cost['dem_total_flops']:.3g} (fine-tunes + search); data mixing "
        f"{cost['mixing_per_run_flops']:.3g} per mixture, {cost['mixing_runs']} trained, "
        f"{search['total_flops']:.3g} to search its proportions at DEM's resolution "
        f"({search['runs']} runs)"
    )
    run_dir = root / "run"
    print(f"base model (what every fine-tune starts from): {run_dir / 'models' / 'base'}")
    print(f"report: {result.report_path}")
    print(f"Hugging Face export: {result.result['hf_export']}")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0
