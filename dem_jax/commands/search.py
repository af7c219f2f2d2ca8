"""``dem-jax search CONFIG.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import math

from dem_jax.commands.help import add_subcommand


def register(sub) -> None:
    """Add the ``search`` subcommand."""
    p = add_subcommand(sub, "search", run)
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. search.steps=50"
    )
    p.add_argument(
        "--no-merged-model",
        action="store_true",
        help="write the search outputs only, not the merged model",
    )


def run(args: argparse.Namespace) -> int:
    """Search, then report the chosen omega and its scores."""
    from dem_jax.commands.common import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.io.run_layout import RunLayout
    from dem_jax.search.outputs import omega_dict
    from dem_jax.search.run import search_from_config

    cfg = load_run_config(args.config, args.overrides)
    result = search_from_config(cfg, progress=log, save_merged=not args.no_merged_model)
    best = result.best
    log(f"chosen omega {omega_dict(best.omega, result.names)}, objective {best.objective:.5f}")
    for name, mean_nll in zip(result.names, best.mean_nll, strict=True):
        log(f"  validation {name}: nll {mean_nll:.4f}  ppl {math.exp(mean_nll):.3f}")
    log(f"wrote {RunLayout(cfg.output_dir).search_dir}")
    return 0
