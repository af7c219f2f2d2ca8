"""``dem-jax merge MERGE.yaml --out DIR``: run a mergekit-format merge config.

See :mod:`dem_jax.merge.request` for what of mergekit's YAML is supported, and for
the dem-jax extensions: ``merge_method: fisher`` / ``regmean`` with a ``data`` file per
model (statistics computed with sharded passes on ``--mesh``). The options of
``mergekit-yaml`` (0.1.5) that apply here are taken under mergekit's spelling:
``--out-shard-size``, ``--copy-tokenizer/--no-copy-tokenizer``, ``--allow-crimes``,
``--random-seed`` and ``--quiet``.
"""

from __future__ import annotations

import argparse
import sys
import time

from dem_jax.commands.help import add_subcommand

NO_SHARD_LIMIT = 2**62  # mergekit's --out-shard-size 0: every tensor in one file


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge as MERGE.yaml says and write the result to --out."""
    from dem_jax.commands.common import parse_kmb, parse_mesh, parse_size
    from dem_jax.errors import DemError
    from dem_jax.io.progress_bar import silenced
    from dem_jax.merge.from_config import merge_from_config

    if args.out_shard_size is not None and args.max_shard_size is not None:
        raise DemError("--out-shard-size and --max-shard-size are one setting: give one")
    if args.out_shard_size is not None:
        max_shard_bytes = parse_kmb(args.out_shard_size) or NO_SHARD_LIMIT
    else:
        max_shard_bytes = parse_size(args.max_shard_size or "5GB")
    start = time.perf_counter()
    with silenced(args.quiet):
        out = merge_from_config(
            args.config,
            args.out,
            format=args.format,
            overwrite=args.overwrite,
            mesh=parse_mesh(args.mesh),
            streaming=not args.in_memory,
            seed=args.seed,
            max_shard_bytes=max_shard_bytes,
            copy_tokenizer=args.copy_tokenizer,
            allow_crimes=args.allow_crimes,
            engine=args.engine,
        )
    if not args.quiet:
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
        "--engine",
        choices=["auto", "host", "jax"],
        default="auto",
        help="host: NumPy on this CPU, without JAX (Hugging Face in and out, no --mesh, "
        "one process; linear, task_arithmetic, dem, ties, breadcrumbs(_ties), dare_*, "
        "della(_linear), slerp, model_stock); jax: the sharded JAX engine; auto "
        "(default): host where it can",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="load every input first (default: stream one parameter at a time; "
        "fisher and regmean always load their inputs)",
    )
    p.add_argument(
        "--seed",
        "--random-seed",
        dest="seed",
        type=int,
        help="seed of the random methods (overrides random_seed in the YAML)",
    )
    p.add_argument(
        "--out-shard-size",
        metavar="SIZE",
        help="largest safetensors shard for --format hf, in mergekit's syntax: 5B = 5 "
        "billion bytes (the default), also k and m; 0 = one file",
    )
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="the same limit as --out-shard-size, written 5GB or 500MiB",
    )
    p.add_argument(
        "--copy-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give the output the tokenizer of tokenizer_source, else of the base model, "
        "else of the first model (--no-copy-tokenizer: none unless tokenizer_source)",
    )
    p.add_argument(
        "--allow-crimes",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="merge models of different architectures when every tensor has the same "
        "name and shape",
    )
    p.add_argument(
        "--quiet",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no progress bars or status line (DEM_JAX_QUIET=1 silences the bars too)",
    )
    return p
