"""One module per ``dem-jax`` subcommand, each with ``register(subparsers)``.

A command module parses arguments and calls into the library; it holds no
logic of its own.
"""
