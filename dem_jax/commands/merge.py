"""``dem-jax merge MERGE.yaml --out DIR``: run a mergekit-format merge config.

See :mod:`dem_jax.merge.request` for what of mergekit's YAML is supported, and for
the dem-jax extensions: ``merge_method: fisher`` / ``regmean`` with a ``data`` file per
model (statistics computed with sharded passes on ``--mesh``).
"""

from __future__ import annotations

import argparse
import sys
import time

from dem_jax.commands.help import add_subcommand


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge as MERGE.yaml says and write the result to --out."""
    from dem_jax.commands.common import parse_mesh, parse_size
    from dem_jax.merge.from_config import merge_from_config

    start = time.perf_counter()
    out = merge_from_config(
        args.config,
        args.out,
        format=args.format,
        overwrite=args.overwrite,
        mesh=parse_mesh(args.mesh),
        streaming=not args.in_memory,
        seed=args.seed,
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    print(f"wrote {out} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``merge`` to the ``dem-jax`` subcommands."""
    p = add_subcommand(subparsers, "merge", cmd_merge)
    p.add_argument(
        "config", help="mergekit-format YAML (model and data paths relative to its folder)"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--format", choices=["hf", "orbax"], default="hf", help="output format")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out once the new one is complete"
    )
    p.add_argument(
        "--mesh",
        help="merge (and compute fisher/regmean statistics) on a device mesh, e.g. fsdp=2,tensor=4",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="load every input first (default: stream one parameter at a time; "
        "fisher and regmean always load their inputs)",
    )
    p.add_argument("--seed", type=int, help="random seed (overrides random_seed in the YAML)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard for --format hf"
    )
    return p
