"""One module per ``dem-jax`` subcommand, each with ``register(subparsers)``.

A command module parses arguments and calls into the library; it holds no
logic of its own. Each imports the library inside its ``run`` function so that
``dem-jax --help`` and argument errors answer without loading JAX; shared
argument helpers are in :mod:`dem_jax.commands.common`.
"""
