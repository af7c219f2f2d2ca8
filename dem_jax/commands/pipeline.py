"""``dem-jax pipeline CONFIG.yaml [key=value ...]``."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add the ``pipeline`` subcommand."""
    p = sub.add_parser(
        "pipeline",
        help="the whole DEM method: fine-tunes, vectors, search, baselines, report, export",
        description="Run every stage of DEM from one config. Completed stages are skipped "
        "on a re-run, so adding a distribution trains only that one.",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary table."""
    from dem_jax.cli import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.pipeline import run_pipeline

    result = run_pipeline(load_run_config(args.config, args.overrides), log=log)
    print(result.summary)
    print(f"\nreport: {result.report_path}")
    return 0
