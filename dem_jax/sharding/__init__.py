"""Spreading work over devices and hosts.

``rules`` (the (data, fsdp, tensor) mesh and the logical-axis table that maps every
parameter onto it), ``placement`` (parameters and batches put on a mesh) and
``distributed`` (joining ``jax.distributed`` from the environment).
"""
