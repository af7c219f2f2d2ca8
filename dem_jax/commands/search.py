"""``dem-jax search CONFIG.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import math


def register(sub) -> None:
    """Add the ``search`` subcommand."""
    p = sub.add_parser(
        "search",
        help="choose merge weights by validation perplexity and write the merged model",
        description="Search merge weights omega for base + sum_i omega_i (finetuned_i - base) "
        "(strategy from the config's search section: grid, random or gradient). Writes the "
        "candidate table (CSV, JSON), the chosen omega and a plot under output_dir/search/, "
        "and the merged model to output_dir/models/dem.",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. search.steps=50"
    )
    p.add_argument(
        "--no-merged-model",
        action="store_true",
        help="write the search outputs only, not the merged model",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Search, then report the chosen omega and its scores."""
    from dem_jax.cli import log
    from dem_jax.config.loader import load_run_config
    from dem_jax.io.run_layout import RunLayout
    from dem_jax.search.run import omega_dict, search_from_config

    cfg = load_run_config(args.config, args.overrides)
    result = search_from_config(cfg, progress=log, save_merged=not args.no_merged_model)
    best = result.best
    log(f"chosen omega {omega_dict(best.omega, result.names)}, objective {best.objective:.5f}")
    for name, mean_nll in zip(result.names, best.mean_nll, strict=True):
        log(f"  validation {name}: nll {mean_nll:.4f}  ppl {math.exp(mean_nll):.3f}")
    log(f"wrote {RunLayout(cfg.output_dir).search_dir}")
    return 0
