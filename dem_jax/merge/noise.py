"""Random draws of the random merge methods, independent of the mesh.

Each leaf's key is the seed folded with a stable hash of the leaf's name, and the
uniforms are drawn over the whole array with ``jax.random`` (partitionable threefry),
sharded like the leaf, so every device draws only its slice and the numbers do not
depend on how the leaf is sharded.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
from jax.sharding import NamedSharding

from dem_jax.io.hf.weights import TensorMap
from dem_jax.merge.method import MergeMethod


def leaf_key(seed: int, tmap: TensorMap) -> jax.Array:
    """The random key of one leaf: the seed folded with a stable hash of its name."""
    digest = zlib.crc32(".".join(tmap.path).encode()) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.key(seed), digest)


def noise_shape(method: MergeMethod, n: int, layer_shape, num_layers: int) -> tuple[int, ...]:
    """Shape of one leaf's uniforms: ``(*layer_shape, K)`` with K = L·N (layer-major) for
    sparsifiers and K = L for parameter selection (``method.noise_count``); moved to
    the front before use.

    The (model, layer) axis comes last so that, collapsed by :func:`draw_layout`,
    a draw on a mesh has at most two dimensions (cheap to compile); partitionable
    threefry's values depend only on the row-major index, so any such reshape
    gives the same numbers.
    """
    return (*layer_shape, method.noise_count(n, num_layers))


def draw_layout(shape: tuple[int, ...], spec: tuple) -> tuple[tuple[int, ...], tuple]:
    """Merge every unsharded dimension into its left neighbour: still a valid tiling of
    the same row-major array, of lower rank."""
    dims: list[list] = []
    for size, axis in zip(shape, spec, strict=True):
        if dims and axis is None:
            dims[-1][0] *= size
        else:
            dims.append([size, axis])
    return tuple(d[0] for d in dims), tuple(d[1] for d in dims)


@functools.lru_cache(maxsize=64)
def _uniform_fn(sharding):
    # One compiled draw per (shape, sharding), shared by every random method and
    # merge: threefry is the slowest thing here to compile, so it stays out of the
    # per-method jobs.
    return jax.jit(jax.random.uniform, static_argnums=1, out_shardings=sharding)


def draw_uniform(key, shape: tuple[int, ...], leaf_sharding, depth: int) -> jax.Array:
    """``jax.random.uniform(key, shape)`` (``shape`` from :func:`noise_shape`), drawn
    sharded like the leaf (whose first ``depth`` axes, layers and experts, index HF
    tensors) so each device draws only its slice; returned collapsed
    (:func:`draw_layout`)."""
    if not isinstance(leaf_sharding, NamedSharding):
        return _uniform_fn(leaf_sharding)(key, (math.prod(shape),))
    spec = tuple(leaf_sharding.spec) + (None,) * (len(shape) + depth - 1 - len(leaf_sharding.spec))
    spec = (*spec[depth:], None)  # layer (and expert) axes dropped, K axis last
    flat_shape, flat_spec = draw_layout(shape, spec)
    sharding = NamedSharding(leaf_sharding.mesh, jax.sharding.PartitionSpec(*flat_spec))
    return _uniform_fn(sharding)(key, flat_shape)
