"""``dem-jax plan CONFIG.yaml [--slice NAME] [--model-config SRC] [--json] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from dem_jax.commands.help import add_subcommand


def register(sub) -> None:
    """Add the ``plan`` subcommand."""
    p = add_subcommand(sub, "plan", run)
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "--slice",
        help="TPU accelerator type, e.g. v4-8, v5litepod-16 (or v5e-16), v5p-32, v6e-8 "
        "(default: the shipped config's own target)",
    )
    p.add_argument(
        "--model-config",
        metavar="SRC",
        help="architecture: a Hugging Face config.json, a model directory, or a known "
        "name (openllama-3b, openllama-7b, openllama-13b, llama-2-7b, mixtral-8x7b, gemma-2-9b, "
        "qwen3-8b, phi-3-mini, qwen3-30b-a3b, olmo-2-7b)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.remat=true"
    )


def run(args: argparse.Namespace) -> int:
    """Print the plan; 0 if it fits, 2 (with the reason on stderr) if not."""
    from dem_jax.plan.memory import plan_json, plan_run

    plan = plan_run(args.config, args.overrides, args.slice, args.model_config)
    print(plan_json(plan) if args.json else plan.format_table())
    if not plan.fits:
        print(f"dem-jax: error: {args.config}: {plan.verdict()}", file=sys.stderr)
        return 2
    return 0
