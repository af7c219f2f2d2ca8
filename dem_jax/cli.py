"""The ``dem-jax`` command line: thin wrappers over the library.

Bad input of any kind ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from dem_jax.errors import DemError

# Subcommand modules in dem_jax.commands, in --help order.
COMMANDS = (
    "demo",
    "pipeline",
    "train",
    "mixture",
    "vectors",
    "merge",
    "score",
    "search",
    "convert",
    "plan",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dem-jax", description="Distribution Edited Models (DEM) in JAX."
    )
    parser.add_argument("--version", action="version", version=f"dem-jax {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dem_jax.commands.{name}").register(sub)
    return parser


def version() -> str:
    """The installed package's version."""
    try:
        return metadata.version("dem-jax")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dem-jax`` and ``python -m dem_jax``."""
    # transformers' advice on import ("PyTorch was not found ...") means nothing to a
    # dem-jax user: the commands use it for tokenizers and configs only.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    # key=value overrides may follow options (argparse alone only takes them
    # before), so collect leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        # Every command joins jax.distributed when the environment asks for it
        # (DEM_JAX_COORDINATOR... or DEM_JAX_DISTRIBUTED=auto), before it touches
        # JAX: on a pod every host runs the same command as one program. Imported
        # here, like each command's library, so that --help and argument errors
        # answer without loading JAX.
        from dem_jax.sharding.compile_cache import enable_compilation_cache
        from dem_jax.sharding.distributed import initialize_from_env

        initialize_from_env()
        enable_compilation_cache()  # compiled programs kept on disk for the next run
        return args.func(args)
    except DemError as e:
        print(f"dem-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
