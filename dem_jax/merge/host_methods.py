"""Each merge method the host executor runs (:mod:`dem_jax.merge.host`), as a function
of one Hugging Face tensor over the math in :mod:`dem_jax.merge.host_kernels`, and the
random stream of each tensor."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from dem_jax.merge import host_geometry as geo
from dem_jax.merge import host_kernels as hk
from dem_jax.merge import host_masks as masks


def _deltas(base, xs):
    """The inputs' task vectors, in their own buffers."""
    return [np.subtract(x, base, out=x) for x in xs]


def _task_arithmetic(sparsifier: str | None, consensus: bool) -> Callable:
    def kernel(base, xs, v, flags, rng):
        deltas = _deltas(base, xs)
        keeps = None
        dens = v.get("density")
        if sparsifier == "magnitude":
            keeps = [hk.magnitude_keep(d, p) for d, p in zip(deltas, dens, strict=True)]
        elif sparsifier == "breadcrumbs":
            keeps = [
                hk.breadcrumbs_keep(d, p, g)
                for d, p, g in zip(deltas, dens, v["gamma"], strict=True)
            ]
        elif sparsifier == "random":  # 32 random bits per entry and model, model by model
            keeps = [
                hk.random_keep(d, p, hk.random_bits(rng, d.shape))
                for d, p in zip(deltas, dens, strict=True)
            ]
        elif sparsifier == "della":
            keeps = [
                hk.della_keep(d, p, e, hk.uniform_from_bits(hk.random_bits(rng, d.shape)))
                for d, p, e in zip(deltas, dens, v["epsilon"], strict=True)
            ]
        return hk.task_arithmetic(
            base,
            deltas,
            np.asarray(v["weight"]),
            keeps=keeps,
            rescale=flags["rescale"],
            consensus=consensus,
            normalize=flags["normalize"],
            lam=v["lambda"],
        )

    return kernel


def _nuslerp(base, xs, v, flags):
    """Two models, or their task vectors when there is a base."""
    t = geo.nuslerp_t(*v["weight"])
    if base is not None:
        xs = _deltas(base, xs)
    out = geo.nuslerp(
        t, xs[0], xs[1], row_wise=flags["nuslerp_row_wise"], flatten=flags["nuslerp_flatten"]
    )
    return out if base is None else base + out


KERNELS: dict[str, Callable] = {
    "task_arithmetic": _task_arithmetic(None, False),
    "dem": _task_arithmetic(None, False),
    "ties": _task_arithmetic("magnitude", True),
    "breadcrumbs": _task_arithmetic("breadcrumbs", False),
    "breadcrumbs_ties": _task_arithmetic("breadcrumbs", True),
    "dare_linear": _task_arithmetic("random", False),
    "dare_ties": _task_arithmetic("random", True),
    "della": _task_arithmetic("della", True),
    "della_linear": _task_arithmetic("della", False),
    "linear": lambda base, xs, v, flags, rng: geo.linear(
        xs, np.asarray(v["weight"]), flags["normalize"]
    ),
    "slerp": lambda base, xs, v, flags, rng: geo.slerp(base, xs[0], v["t"]),
    "nuslerp": lambda base, xs, v, flags, rng: _nuslerp(base, xs, v, flags),
    "multislerp": lambda base, xs, v, flags, rng: geo.multislerp(
        xs, v["weight"], base, normalize_weights=flags["normalize_weights"], eps=v["eps"]
    ),
    "nearswap": lambda base, xs, v, flags, rng: geo.nearswap(base, xs[0], v["t"]),
    "model_stock": lambda base, xs, v, flags, rng: geo.model_stock(base, xs, flags["filter_wise"]),
    "passthrough": lambda base, xs, v, flags, rng: geo.passthrough(xs[0], v["scale"][0]),
    "karcher": lambda base, xs, v, flags, rng: geo.karcher(xs, v["max_iter"], v["tol"]),
    "sce": lambda base, xs, v, flags, rng: masks.sce(base, _deltas(base, xs), v["select_topk"]),
    "ram": lambda base, xs, v, flags, rng: masks.ram(base, _deltas(base, xs), v["epsilon"]),
    "ramplus_tl": lambda base, xs, v, flags, rng: masks.ram(
        base, _deltas(base, xs), v["epsilon"], v["r"], v["alpha"]
    ),
    "arcee_fusion": lambda base, xs, v, flags, rng: masks.arcee_fusion(base, xs[0]),
}
"""Per HF tensor: (base float32 or None, inputs float32, values of this tensor
(per-model ones as lists), static flags, the tensor's random generator) -> float32."""


def tensor_rng(seed: int, name: str) -> np.random.SFC64:
    """The random stream of one HF tensor: NumPy's SFC64 bit generator keyed by the
    merge seed and a stable hash of the tensor's name, so draws depend on neither
    thread nor order. (SFC64 gives 32 bits in 0.8 ns here, a float32 uniform from
    PCG64 takes 1.8 ns. The JAX engine draws threefry uniforms instead: the same
    distribution, other numbers; each engine is reproducible on its own.)"""
    return np.random.SFC64([seed, zlib.crc32(name.encode())])
