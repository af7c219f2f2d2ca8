"""``dem-jax demo [--out DIR]``."""

from __future__ import annotations

import argparse

from dem_jax.commands.help import add_subcommand


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = add_subcommand(sub, "demo", run)
    p.add_argument("--out", default="dem_jax_demo", help="output directory")


def run(args: argparse.Namespace) -> int:
    """Run the demo pipeline under ``--out``."""
    from dem_jax.commands.common import log
    from dem_jax.demo.run import run_demo

    return run_demo(args.out, log=log)
