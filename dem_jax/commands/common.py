"""What the command modules share: argument parsers for sizes and meshes, and the
status line on stderr."""

from __future__ import annotations

import re
import sys

from dem_jax.errors import DemError
from dem_jax.lazy import process_count

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


def parse_kmb(text: str, flag: str = "--out-shard-size") -> int:
    """mergekit's size syntax ('5B', '500M', '20k', '1000': an integer with an optional
    k/m/b suffix for thousands, millions, billions) -> bytes; 0 means no limit."""
    m = re.fullmatch(r"\s*(\d+)([kmb]?)\s*", text, re.IGNORECASE)
    if not m:
        raise DemError(
            f"{flag}: cannot parse {text!r} (mergekit's syntax: an integer with an optional "
            "k, m or b suffix, e.g. 5B = 5 billion bytes; --max-shard-size takes 5GB, 500MiB)"
        )
    return int(m.group(1)) * 1000 ** " kmb".index(m.group(2).lower() or " ")


def parse_mesh(text: str | None):
    """'fsdp=2,tensor=4' -> a Mesh over the devices of every process.

    Not given: None (the default device) in a single process; with several
    processes an fsdp mesh over all devices, since the default device is one
    that the other processes cannot address.
    """
    if not text and process_count() == 1:
        return None
    from dem_jax.sharding.rules import MESH_AXES, make_mesh  # JAX, only for a mesh

    if not text:
        return make_mesh()

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
