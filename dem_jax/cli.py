"""The ``dem-jax`` command line: thin wrappers over the library.

Bad input of any kind ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    """'fsdp=2,tensor=4' -> a Mesh over this host's devices (None when not given)."""
    if not text:
        return None
    from dem_jax.sharding import MESH_AXES, make_mesh

    sizes = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise DemError(f"--mesh: bad entry {part!r} (expected e.g. data=1,fsdp=2,tensor=4)")
        sizes[key.strip()] = int(value)
    if "fsdp" not in sizes and -1 in sizes.values():
        sizes["fsdp"] = 1  # fsdp otherwise defaults to "the remaining devices"
    return make_mesh(**sizes)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_convert(args: argparse.Namespace) -> int:
    """hf-to-orbax / orbax-to-hf."""
    from dem_jax.api import load_model, save_model
    from dem_jax.modeldir import model_format

    want = "hf" if args.direction == "hf-to-orbax" else "orbax"
    found = model_format(args.src)
    if found != want:
        kind = {"hf": "a Hugging Face", "orbax": "a dem-jax"}
        raise DemError(
            f"{args.src}: is {kind[found]} directory, but {args.direction} "
            f"needs {kind[want]} directory"
        )
    if Path(args.dst).exists() and not args.overwrite:
        raise DemError(f"{args.dst}: output already exists (pass --overwrite to replace it)")
    start = time.perf_counter()
    model = load_model(args.src, mesh=parse_mesh(args.mesh), dtype=args.dtype)
    c = model.config
    _log(
        f"loaded {args.src}: {c.architecture}, {c.num_layers} layers, "
        f"{c.num_params / 1e6:.2f}M params, {c.param_dtype} ({time.perf_counter() - start:.1f}s)"
    )
    fmt = "orbax" if want == "hf" else "hf"
    kwargs = {"max_shard_bytes": parse_size(args.max_shard_size)} if fmt == "hf" else {}
    out = save_model(model, args.dst, format=fmt, overwrite=args.overwrite, **kwargs)
    _log(f"wrote {out} ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the full DEM pipeline lands: a converter round trip on a tiny built-in model."""
    from dem_jax.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dem-jax", description="Distribution Edited Models (DEM) in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the built-in demo on CPU")
    demo.add_argument("--out", default="dem_jax_demo", help="output directory")
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser("convert", help="convert between Hugging Face and dem-jax formats")
    convert.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    convert.add_argument("src", help="source model directory")
    convert.add_argument("dst", help="destination directory (must not exist)")
    convert.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast parameters (default: keep the stored dtype)",
    )
    convert.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard when writing HF (default 5GB)",
    )
    convert.add_argument("--mesh", help="load onto a device mesh, e.g. fsdp=2,tensor=4")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace dst if it exists (only once the new one is complete)",
    )
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dem-jax`` and ``python -m dem_jax``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DemError as e:
        print(f"dem-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
