"""``dem-jax mixture CONFIG.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    """Add the ``mixture`` subcommand."""
    p = sub.add_parser(
        "mixture",
        help="TaskPGM mixture proportions from the fine-tuned models' similarity",
        description="Load the fine-tuned model of every distribution (output_dir/models/NAME), "
        "compute their PMI and JSD similarity on the validation sets and the TaskPGM "
        "proportions from the one pipeline.taskpgm.similarity names. Writes proportions.json, "
        "similarity.json (both matrices) and heatmap.png under output_dir/mixture/; train "
        "with them with data.mixture=taskpgm.",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. pipeline.taskpgm.similarity=jsd",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute and write the proportions; print them as JSON."""
    from dem_jax.cli import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.pipeline.data_stages import taskpgm_from_config

    cfg = load_run_config(args.config, args.overrides)
    found = taskpgm_from_config(cfg, progress=log)
    print(json.dumps(found["proportions"], indent=2))
    return 0
