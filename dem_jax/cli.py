"""The ``dem-jax`` command line: thin wrappers over the library.

Bad input of any kind ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from dem_jax.errors import DemError

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000' -> bytes (decimal and binary units, like transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise DemError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MiB)")
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise DemError(f"--max-shard-size: must be positive, got {text!r}")
    return int(value)


def parse_mesh(text: str | None):
    """'fsdp=2,tensor=4' -> a Mesh over the devices of every process.

    Not given: None (the default device) in a single process; with several
    processes an fsdp mesh over all devices, since the default device is one
    that the other processes cannot address.
    """
    import jax

    from dem_jax.sharding.rules import MESH_AXES, make_mesh

    if not text:
        return make_mesh() if jax.process_count() > 1 else None

    sizes = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise DemError(f"--mesh: bad entry {part!r} (expected e.g. data=1,fsdp=2,tensor=4)")
        sizes[key.strip()] = int(value)
    if "fsdp" not in sizes and -1 in sizes.values():
        sizes["fsdp"] = 1  # fsdp otherwise defaults to "the remaining devices"
    return make_mesh(**sizes)


def log(message: str) -> None:
    """A progress or status line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


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
    import importlib

    parser = argparse.ArgumentParser(
        prog="dem-jax", description="Distribution Edited Models (DEM) in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dem_jax.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dem-jax`` and ``python -m dem_jax``."""
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
        # JAX: on a pod every host runs the same command as one program.
        from dem_jax.sharding.distributed import initialize_from_env

        initialize_from_env()
        return args.func(args)
    except DemError as e:
        print(f"dem-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
