"""Spreading work over devices and hosts, and the JAX runtime every command sets up.

``rules`` (the (data, fsdp, expert, tensor) mesh and the logical-axis table that maps
every parameter onto it), ``placement`` (parameters and batches put on a mesh),
``distributed`` (joining ``jax.distributed`` from the environment) and
``compile_cache`` (XLA's compiled programs kept on disk between commands).
"""
