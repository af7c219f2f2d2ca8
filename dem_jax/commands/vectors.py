"""``dem-jax vectors``: distribution vectors of fine-tuned models, and their diagnostics.

    dem-jax vectors --base base/ --model code=ft/code --model math=ft/math --out vectors/

writes ``vectors/code`` and ``vectors/math`` (dem-jax vector directories) and
``vectors/diagnostics.json``, and prints the diagnostics (``--json``: as JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from dem_jax.commands.help import add_named, add_subcommand
from dem_jax.errors import DemError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DIAGNOSTICS_FILE = "diagnostics.json"


def parse_named_paths(entries: list[str], flag: str = "--model") -> list[tuple[str, str]]:
    """['code=ft/code', ...] -> [('code', 'ft/code'), ...]; names distinct and file-safe."""
    out: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not path or not _NAME.fullmatch(name):
            raise DemError(
                f"{flag}: expected NAME=PATH with NAME of letters, digits, '_', '-', '.', "
                f"got {entry!r}"
            )
        if any(name == n for n, _ in out):
            raise DemError(f"{flag}: name {name!r} given twice")
        out.append((name, path))
    return out


def cmd_vectors(args: argparse.Namespace) -> int:
    """Compute, save and diagnose one vector per --model."""
    from dem_jax.commands.common import parse_mesh
    from dem_jax.io import storage
    from dem_jax.io.models import load_model
    from dem_jax.io.outputs import check_disjoint, check_writable
    from dem_jax.sharding.distributed import is_main_process
    from dem_jax.vectors.diagnostics import format_diagnostics, vector_diagnostics
    from dem_jax.vectors.store import VECTOR_METADATA, save_vector
    from dem_jax.vectors.vector import distribution_vector

    models = parse_named_paths(args.model)
    out = storage.path(args.out)
    if out.exists() and not out.is_dir():
        raise DemError(f"{out}: --out exists and is not a directory")
    if not storage.parent_exists(out):
        raise DemError(f"{out.parent}: --out's parent directory does not exist")
    check_disjoint(out, [("base model", args.base), *(("model", p) for _, p in models)], "--out")
    for name, _ in models:
        if out.exists():
            check_writable(out / name, args.overwrite, (VECTOR_METADATA,))
    mesh = parse_mesh(args.mesh)
    start = time.perf_counter()
    created = not out.exists()
    try:
        base = load_model(args.base, mesh=mesh)
        storage.makedirs(out)
        vectors = []
        for name, path in models:
            model = load_model(path, mesh=mesh)
            vec = distribution_vector(base, model, name=name, base_path=args.base, model_path=path)
            del model
            save_vector(vec, out / name, overwrite=args.overwrite)
            vectors.append(vec)
            print(f"wrote {out / name} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    except BaseException:
        # A run that fails before its first vector leaves no empty --out behind.
        if created and is_main_process() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    diag = vector_diagnostics(vectors, [n for n, _ in models])
    if is_main_process():
        storage.write_text(out / DIAGNOSTICS_FILE, json.dumps(diag, indent=2) + "\n")
    print(json.dumps(diag, indent=2) if args.json else format_diagnostics(diag))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``vectors`` to the ``dem-jax`` subcommands."""
    p = add_subcommand(subparsers, "vectors", cmd_vectors)
    p.add_argument("--base", required=True, help="base model directory (HF or dem-jax)")
    add_named(p, "--model", "NAME=PATH", "a fine-tuned model")
    p.add_argument("--out", required=True, help="directory for one vector per NAME")
    p.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    p.add_argument("--mesh", help="compute on a device mesh, e.g. fsdp=2,tensor=4")
    p.add_argument("--overwrite", action="store_true", help="replace existing vectors")
    return p
