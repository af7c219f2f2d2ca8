"""``dem-jax train CONFIG.yaml (--distribution NAME | --mixture) [key=value ...]``."""

from __future__ import annotations

import argparse

from dem_jax.commands.help import add_subcommand
from dem_jax.errors import DemError


def register(sub) -> None:
    """Add the ``train`` subcommand."""
    p = add_subcommand(sub, "train", run)
    p.add_argument("config", help="run config YAML")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--distribution", help="name of a distribution in data.distributions")
    which.add_argument(
        "--mixture",
        action="store_true",
        help="train one model on the data.mixture of all distributions",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20"
    )


def run(args: argparse.Namespace) -> int:
    """Train and report where the model went."""
    from dem_jax.commands.common import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.io.run_layout import MIXTURE
    from dem_jax.train.loop import Preempted, run_training

    cfg = load_run_config(args.config, args.overrides)
    name = MIXTURE if args.mixture else args.distribution
    if name == MIXTURE and args.distribution == MIXTURE:
        raise DemError(f"--distribution: {MIXTURE!r} is reserved for --mixture")
    try:
        result = run_training(cfg, name, log=log)
    except Preempted as e:
        log(str(e))
        return 143
    for dist, r in result.final_eval.items():
        log(f"  validation {dist}: nll {r['nll']:.4f}  ppl {r['ppl']:.3f}  ({r['tokens']} tokens)")
    return 0
