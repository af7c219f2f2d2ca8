"""``dem-jax pipeline CONFIG.yaml [key=value ...]``."""

from __future__ import annotations

import argparse

from dem_jax.commands.help import add_subcommand


def register(sub) -> None:
    """Add the ``pipeline`` subcommand."""
    p = add_subcommand(sub, "pipeline", run)
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary table."""
    from dem_jax.commands.common import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.pipeline import run_pipeline

    result = run_pipeline(load_run_config(args.config, args.overrides), log=log)
    print(result.summary)
    print(f"\nreport: {result.report_path}")
    return 0
