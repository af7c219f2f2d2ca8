"""``dem-jax demo [--out DIR]``."""

from __future__ import annotations


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="run the built-in demo on CPU")
    p.add_argument("--out", default="dem_jax_demo", help="output directory")
    p.set_defaults(func=lambda args: __import__("dem_jax.demo").demo.run_demo(args.out))
