"""The host executor: a MERGE.yaml over Hugging Face checkpoints, merged on this
machine's CPU with NumPy, without importing JAX.

A merge is memory-bound: it reads each input tensor once and writes each output
tensor once. On one machine the JAX engine's whole-command time was mostly fixed
costs (importing JAX and flax, compiling a program per tensor shape), and its TIES
top-k a 31-pass radix select; mergekit users merge on a CPU too (issue #12). So
``dem-jax merge`` runs here whenever it can (``--engine auto``): Hugging Face
inputs and output, no device mesh, one process, and a method with a NumPy kernel
(:mod:`dem_jax.merge.host_kernels`). Everything else (Orbax inputs or output,
distribution vectors, ``--mesh``, pods, ``slices:``, the data-aware methods, the
other methods) runs on the JAX engine, as does anything this executor is unsure of
(tensors it does not expect, models whose configs differ): the engine's checks then
name the problem.

What it shares with the engine: the parsed request, the per-tensor parameter
resolution (:func:`dem_jax.merge.params.resolve_leaf`), the output's tensor list
and order (:func:`dem_jax.io.hf.weights.tensor_maps`), dtype rules (inputs cast to
the checkpoint's dtype, then rounded to ``dtype``, merged in float32, written in
``out_dtype``), config.json, assets and model card. Random methods (DARE, DELLA)
draw from NumPy's SFC64 per tensor (:func:`tensor_rng`), the JAX engine from
threefry: each reproducible for a seed, the two not the same numbers. Tensors are
merged on a thread per core (NumPy releases the GIL), read with ``pread`` (nothing
stays mapped) and written in order, so memory is a few tensors per input.
"""

from __future__ import annotations

import collections
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.config import from_hf_config, to_hf_config
from dem_jax.io.hf.directory import finish_hf_directory, hf_writer
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint
from dem_jax.io.hf.safetensors_writer import TensorSpec
from dem_jax.io.hf.weights import hf_names, tensor_maps
from dem_jax.io.modeldir import HF_CONFIG, model_format
from dem_jax.io.outputs import atomic_directory
from dem_jax.io.storage import read_json
from dem_jax.lazy import process_count
from dem_jax.merge import host_kernels as hk
from dem_jax.merge.method import check_input_count
from dem_jax.merge.params import LeafValues, resolve_leaf, settings_chain
from dem_jax.merge.registry import get_method
from dem_jax.merge.request import MergeRequest
from dem_jax.merge.vocab import VOCAB_TENSORS, Vocabulary, align_rows

F32 = np.float32
_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ENGINES = ("auto", "host", "jax")


# ------------------------------------------------------------------ the kernels


def _task_arithmetic(sparsifier: str | None, consensus: bool) -> Callable:
    def kernel(base, xs, v, flags, rng):
        deltas = [np.subtract(x, base, out=x) for x in xs]  # our own buffers
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
    "linear": lambda base, xs, v, flags, rng: hk.linear(
        xs, np.asarray(v["weight"]), flags["normalize"]
    ),
    "slerp": lambda base, xs, v, flags, rng: hk.slerp(base, xs[0], v["t"]),
    "model_stock": lambda base, xs, v, flags, rng: hk.model_stock(base, xs, flags["filter_wise"]),
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


# ------------------------------------------------------------------ eligibility


def why_not_host(req: MergeRequest, *, format: str, mesh: Any) -> str | None:
    """Why this request must run on the JAX engine, or None if the host executor can
    try it (it may still decline once the checkpoints are open)."""
    if format != "hf":
        return "it writes Hugging Face safetensors only (--format hf)"
    if mesh is not None:
        return "it runs without a device mesh (drop --mesh)"
    if process_count() > 1 or os.environ.get("DEM_JAX_COORDINATOR"):
        return "it runs in one process"
    if req.method not in KERNELS:
        return f"merge_method {req.method} runs on the JAX engine (host: {', '.join(KERNELS)})"
    if req.slices is not None or any(r is not None for r in req.layer_ranges):
        return "slices: and layer ranges run on the JAX engine"
    for p in [req.base, *req.models]:
        if p is None:
            continue
        try:  # vectors, Orbax models and missing paths: the engine says what they are
            local_hf = not storage.is_url(p) and model_format(p) == "hf"
        except DemError as e:
            return str(e)
        if not local_hf:
            return f"{p} is not a local Hugging Face model directory"
    return None


# ------------------------------------------------------------------ the merge


@dataclass
class _Input:
    path: Path
    label: str
    ckpt: SafetensorsCheckpoint
    hf_config: dict[str, Any]
    config: ModelConfig  # param_dtype = the stored dtype of the embedding


def _open(path: Path) -> _Input:
    hf_config = read_json(path / HF_CONFIG)
    config = from_hf_config(hf_config, str(path / HF_CONFIG))
    ckpt = SafetensorsCheckpoint(path)
    code = ckpt.code("model.embed_tokens.weight") if "model.embed_tokens.weight" in ckpt else None
    stored = _FLOATS.get(code, "?")
    return _Input(
        path, str(path), ckpt, hf_config, config.replace(param_dtype=stored, dtype=stored)
    )


class HostMerge:
    """A request's merge, checked for the host executor; ``self.declined`` says why not."""

    def __init__(self, req: MergeRequest, seed: int, vocabulary: Vocabulary | None = None):
        self.req, self.seed, self.voc = req, seed, vocabulary
        self.method = get_method(req.method)
        check_input_count(self.method, len(req.models), req.base is not None)
        self.inputs: list[_Input] = []
        self.declined: str | None = None
        try:
            self.base = None if req.base is None else _open(req.base)
            self.models = [_open(p) for p in req.models]
        except DemError as e:  # the engine reports it (with its wording)
            self.declined = str(e)
            return
        self.inputs = [x for x in [self.base, *self.models] if x is not None]
        self.declined = self._check()

    def _check(self) -> str | None:
        ref = self.base or self.models[0]
        self.config = ref.config
        stored = {x.config.param_dtype for x in self.inputs}
        if "?" in stored:
            return "an input's embedding is not float32, bfloat16 or float16"

        def same(c):  # vocabularies may differ when they are re-indexed
            c = c.replace(vocab_size=1) if self.voc is not None else c
            return c.replace(param_dtype="float32", dtype="float32")

        if any(same(x.config) != same(ref.config) for x in self.inputs):
            return "the models' configs differ (the JAX engine checks them)"
        if self.voc is not None:
            self.config = self.config.replace(vocab_size=self.voc.size)
        cfg = self.config
        self.tmaps = tensor_maps(cfg)
        names = [n for t in self.tmaps for n in hf_names(t, cfg)]
        for x in self.inputs:
            if set(x.ckpt.keys()) != set(names):
                return f"{x.label} holds other tensors than a {cfg.architecture} has"
            for n in names:
                skip = 1 if self.voc is not None and n in VOCAB_TENSORS else 0  # rows = tokens
                if (
                    x.ckpt.code(n) not in _FLOATS
                    or x.ckpt.shape(n)[skip:] != ref.ckpt.shape(n)[skip:]
                ):
                    return f"{x.label}: tensor {n} differs in shape or is not a float"
        promoted = stored.pop() if len(stored) == 1 else "float32"  # as jnp.promote_types
        self.out_dtype = self.req.out_dtype or self.req.dtype or promoted
        chain = settings_chain(self.req.parameters)
        labels = [str(p) for p in self.req.models]
        self.values = {  # every parameter resolved (and checked) before any read
            t.path: resolve_leaf(
                self.method,
                t,
                cfg.num_layers,
                chain,
                self.req.model_parameters,
                labels,
                cfg.num_experts,
            )
            for t in self.tmaps
        }
        return None

    def close(self) -> None:
        """Close every input."""
        for x in self.inputs:
            x.ckpt.close()

    # -- reading and merging one tensor

    def _read(self, x: _Input, name: str) -> np.ndarray:
        """One input tensor as float32: cast to the checkpoint's dtype (as the engine
        loads it), then rounded to the merge's ``dtype``."""
        code = x.ckpt.code(name)
        raw = x.ckpt.read(name, raw=True)
        if code == "BF16":
            t = hk.bf16_to_f32(raw)
        else:  # float32 is the read buffer itself (ours: kernels may write into it)
            t = raw.view(x.ckpt.dtype(name)).astype(F32, copy=False)
        held = _FLOATS[code]  # the dtype whose values t holds (rounding to it: no-op)
        if held != x.config.param_dtype:
            t, held = hk.round_to(t, x.config.param_dtype), x.config.param_dtype
        want = self.req.dtype
        return t if want is None or want == held else hk.round_to(t, want)

    def _merge(self, name: str, values: dict[str, Any], flags: dict[str, Any]) -> np.ndarray:
        if self.voc is not None and name in VOCAB_TENSORS:
            base, xs = self._aligned(name)
        else:
            base = None if self.base is None else self._read(self.base, name)
            xs = [self._read(x, name) for x in self.models]
        rng = tensor_rng(self.seed, name) if self.method.random else None
        out = KERNELS[self.method.name](base, xs, values, flags, rng)
        del base, xs
        if self.out_dtype == "bfloat16":
            return hk.f32_to_bf16(out)  # the bits, written as BF16 (see write)
        return out.astype(self.out_dtype, copy=False)

    def _aligned(self, name: str):
        """A vocabulary tensor of every input, re-indexed to the output's tokens: (base,
        models), read once per distinct input, in mergekit's order (the YAML's models,
        then an unlisted base) for the rows made from several inputs."""
        order = {x.path: x for x in self.models}
        if self.base is not None:
            order.setdefault(self.base.path, self.base)
        aligned = dict(
            zip(
                order,
                align_rows(self.voc, [(p, self._read(x, name)) for p, x in order.items()]),
                strict=True,
            )
        )
        base = None if self.base is None else aligned[self.base.path]
        return base, [aligned[x.path].copy() for x in self.models]

    def _jobs(self):
        """(HF name, this tensor's values, static flags) in export order."""
        cfg = self.config
        for t in self.tmaps:
            leaf = self.values[t.path]
            for i, name in enumerate(hf_names(t, cfg)):
                yield name, *_tensor_values(self.method, leaf, i)

    # -- the whole merge

    def write(self, out, overwrite: bool, max_shard_bytes: int, assets_dir, metadata) -> Path:
        """Merge into ``out`` (complete or absent), ``workers`` tensors at a time."""
        # bfloat16 as its uint16 bits with the BF16 code: no ml_dtypes (0.6 s to import)
        np_dtype, code = {
            "float32": (np.dtype(F32), None),
            "float16": (np.dtype(np.float16), None),
            "bfloat16": (np.dtype(np.uint16), "BF16"),
        }[self.out_dtype]
        ref = self.base or self.models[0]
        specs = [
            TensorSpec(n, self._shape(ref, n), np_dtype, code)
            for t in self.tmaps
            for n in hf_names(t, self.config)
        ]
        workers = max(1, min(len(os.sched_getaffinity(0)), 8))
        hf_config = next(x.hf_config for x in self.inputs)
        if self.voc is not None:  # the merged model's vocabulary (mergekit writes it too)
            hf_config = {**hf_config, "vocab_size": self.voc.size}
        out_config = to_hf_config(self.config.replace(param_dtype=self.out_dtype), hf_config)
        with atomic_directory(out, overwrite) as tmp:
            desc = f"merging into {storage.path(out).name}"
            writer = hf_writer(tmp, specs, max_shard_bytes, desc)
            with writer, ThreadPoolExecutor(workers) as pool:
                pending: collections.deque = collections.deque()
                for job in self._jobs():
                    pending.append((job[0], pool.submit(self._merge, *job)))
                    if len(pending) > workers:  # bounded: a few tensors in memory
                        name, fut = pending.popleft()
                        writer.write(name, fut.result())
                while pending:
                    name, fut = pending.popleft()
                    writer.write(name, fut.result())
            finish_hf_directory(tmp, out_config, assets_dir or ref.path, metadata)
        return storage.path(out)

    def _shape(self, ref: _Input, name: str) -> tuple[int, ...]:
        shape = tuple(ref.ckpt.shape(name))
        if self.voc is not None and name in VOCAB_TENSORS:
            return (self.voc.size, *shape[1:])
        return shape


def _tensor_values(method, leaf: LeafValues, i: int) -> tuple[dict, dict]:
    """Tensor ``i`` of a leaf: its parameter values (per-model ones as lists) and the
    method's static flags."""
    values = {name: [row[i] for row in rows] for name, rows in leaf.per_model}
    values.update({name: vals[i] for name, vals in leaf.shared})
    flags = {name: values[name] for name in method.static_flags}
    return values, flags


def run_host(
    req: MergeRequest,
    out,
    *,
    engine: str,
    format: str,
    mesh: Any,
    seed: int,
    overwrite: bool,
    max_shard_bytes: int,
    assets_dir,
    config_yaml: str | None,
    vocabulary: Vocabulary | None = None,
) -> Path | None:
    """Merge on the host if ``engine`` allows and the request suits it; None to leave it
    to the JAX engine (``engine="host"`` refuses instead, naming why)."""
    reason = "--engine jax" if engine == "jax" else why_not_host(req, format=format, mesh=mesh)
    plan = None
    if reason is None:
        plan = HostMerge(req, seed, vocabulary)
        reason = plan.declined
    try:
        if reason is not None:
            if vocabulary is not None:
                raise DemError(
                    "tokenizer: the models' vocabularies differ, and re-indexing them runs "
                    f"on the host executor only, which this merge cannot use: {reason}"
                )
            if engine == "host":
                raise DemError(f"--engine host: {reason}")
            return None
        metadata = {
            "merge": {
                "method": plan.method.name,
                "base": None if req.base is None else str(req.base),
                "models": [str(p) for p in req.models],
                "seed": seed,
            }
        }
        if config_yaml is not None:
            metadata["merge"]["config_yaml"] = config_yaml
        return plan.write(out, overwrite, max_shard_bytes, assets_dir, metadata)
    finally:
        if plan is not None:
            plan.close()
