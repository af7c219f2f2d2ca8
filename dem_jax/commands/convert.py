"""``dem-jax convert hf-to-orbax|orbax-to-hf SRC DST``."""

from __future__ import annotations

import argparse
import time

from dem_jax.commands.help import add_subcommand
from dem_jax.errors import DemError


def register(sub) -> None:
    """Add the ``convert`` subcommand."""
    p = add_subcommand(sub, "convert", run)
    p.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    p.add_argument("src", help="source model directory")
    p.add_argument("dst", help="destination directory (must not exist)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast parameters (default: keep the stored dtype)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard when writing HF (default 5GB)",
    )
    p.add_argument("--mesh", help="load onto a device mesh, e.g. fsdp=2,tensor=4")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace dst if it exists (only once the new one is complete)",
    )


def run(args: argparse.Namespace) -> int:
    """Load SRC, write DST in the other format."""
    from dem_jax.commands.common import log, parse_mesh, parse_size
    from dem_jax.io.modeldir import model_format
    from dem_jax.io.models import load_model, save_model
    from dem_jax.io.outputs import check_disjoint, check_writable

    want = "hf" if args.direction == "hf-to-orbax" else "orbax"
    found = model_format(args.src)
    if found != want:
        kind = {"hf": "a Hugging Face", "orbax": "a dem-jax"}
        raise DemError(
            f"{args.src}: is {kind[found]} directory, but {args.direction} "
            f"needs {kind[want]} directory"
        )
    check_disjoint(args.dst, [("source model", args.src)], "dst")
    check_writable(args.dst, args.overwrite)
    fmt = "orbax" if want == "hf" else "hf"
    kwargs = {"max_shard_bytes": parse_size(args.max_shard_size)} if fmt == "hf" else {}
    start = time.perf_counter()
    model = load_model(args.src, mesh=parse_mesh(args.mesh), dtype=args.dtype)
    c = model.config
    log(
        f"loaded {args.src}: {c.architecture}, {c.num_layers} layers, "
        f"{c.num_params / 1e6:.2f}M params, {c.param_dtype} ({time.perf_counter() - start:.1f}s)"
    )
    out = save_model(model, args.dst, format=fmt, overwrite=args.overwrite, **kwargs)
    log(f"wrote {out} ({time.perf_counter() - start:.1f}s)")
    return 0
