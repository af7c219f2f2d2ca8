"""``dem-jax mixture CONFIG.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import json

from dem_jax.commands.help import add_subcommand


def register(sub) -> None:
    """Add the ``mixture`` subcommand."""
    p = add_subcommand(sub, "mixture", run)
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. pipeline.taskpgm.similarity=jsd",
    )


def run(args: argparse.Namespace) -> int:
    """Compute and write the proportions; print them as JSON."""
    from dem_jax.commands.common import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.mixture.stage import taskpgm_from_config

    cfg = load_run_config(args.config, args.overrides)
    found = taskpgm_from_config(cfg, progress=log)
    print(json.dumps(found["proportions"], indent=2))
    return 0
