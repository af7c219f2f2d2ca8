"""``dem-jax demo [--out DIR]``."""

from __future__ import annotations

import argparse

from dem_jax.commands.help import add_subcommand

DESCRIPTION = (
    "Run the whole DEM pipeline on built-in synthetic data (four distributions, a small "
    "Llama) on the CPU: pretrain a base, fine-tune it once per distribution, take the "
    "distribution vectors, search the merge weights, train and build the baselines, "
    "evaluate everything and write a report. About 6 minutes on an idle 2-core CPU "
    "(372 s measured); "
    "progress lines go to stderr, the results table to stdout. Writes under --out: "
    "data/ (tokenizer, JSONL files), config.yaml (rerun with `dem-jax pipeline`), and run/ "
    "with run/models/base (the pretrained base every fine-tune starts from; "
    "run/models/init is only its random initialisation), run/models/NAME (the fine-tunes), "
    "run/models/dem and run/models/dem-hf (the DEM model, dem-jax and Hugging Face "
    "formats), run/vectors/, run/search/ and run/report/report.md. Running it again on the"
    " same --out resumes and skips what is done."
)


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = add_subcommand(sub, "demo", run)
    p.description = DESCRIPTION
    p.add_argument(
        "--out", default="dem_jax_demo", help="output directory (default: ./dem_jax_demo)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo pipeline under ``--out``."""
    from dem_jax.commands.common import log
    from dem_jax.demo.run import run_demo

    return run_demo(args.out, log=log)
