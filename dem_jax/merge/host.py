"""The host executor: a MERGE.yaml over Hugging Face checkpoints, merged on this
machine's CPU with NumPy, without importing JAX.

A merge is memory-bound: it reads each input tensor once and writes each output
tensor once. On one machine the JAX engine's whole-command time was mostly fixed
costs (importing JAX and flax, compiling a program per tensor shape), and its TIES
top-k a 31-pass radix select; mergekit users merge on a CPU too (issue #12). So
``dem-jax merge`` runs here whenever it can (``--engine auto``): Hugging Face
inputs and output, no device mesh, one process, and a method with a NumPy kernel
(:mod:`dem_jax.merge.host_kernels`), over ``models:`` or ``slices:`` (each output
tensor reads its slice's sources at their own layers, by mergekit's rules in
:mod:`dem_jax.merge.slice_rules`). Everything else (Orbax inputs or output,
distribution vectors, ``--mesh``, pods, the data-aware methods, the other methods)
runs on the JAX engine, as does anything this executor is unsure of
(tensors it does not expect, models whose configs differ): the engine's checks then
name the problem.

What it shares with the engine: the parsed request, the per-tensor parameter
resolution (:func:`dem_jax.merge.params.resolve_values`), the output's tensor list
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
import dataclasses
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.config import from_hf_config, to_hf_config, with_layers
from dem_jax.io.hf.directory import finish_hf_directory, hf_writer
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint
from dem_jax.io.hf.safetensors_writer import TensorSpec
from dem_jax.io.hf.weights import hf_names, tensor_maps
from dem_jax.io.modeldir import HF_CONFIG, model_format
from dem_jax.io.outputs import atomic_directory
from dem_jax.io.storage import read_json
from dem_jax.lazy import process_count
from dem_jax.merge import host_kernels as hk
from dem_jax.merge.host_methods import KERNELS, tensor_rng
from dem_jax.merge.method import check_input_count
from dem_jax.merge.params import LeafValues, Settings, resolve_values, settings_chain
from dem_jax.merge.registry import get_method
from dem_jax.merge.request import MergeRequest
from dem_jax.merge.slice_rules import final_inputs, slices_of
from dem_jax.merge.tensor_layout import layer_names_and_ts
from dem_jax.merge.vocab import VOCAB_TENSORS, Vocabulary, align_rows

F32 = np.float32
_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ENGINES = ("auto", "host", "jax")


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
    if any(r is not None for r in req.layer_ranges):
        return "layer ranges of the data-aware methods run on the JAX engine"
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


@dataclass(frozen=True)
class _Part:
    """What one output slice merges (a ``models:`` merge is one slice of every layer):
    its inputs, the first layer read from each, and their settings."""

    where: str
    offset: int  # its first output layer
    length: int  # its layers
    base: _Input | None
    base_start: int
    models: tuple[_Input, ...]
    starts: tuple[int, ...]  # each model's first layer
    settings: tuple[Settings | None, ...]
    labels: tuple[str, ...]
    chain: tuple[Settings | None, ...]

    def sources(self) -> list[tuple[_Input, int]]:
        """(input, first layer) of its base, if any, then of each model."""
        base = [(self.base, self.base_start)] if self.base is not None else []
        return base + list(zip(self.models, self.starts, strict=True))

    def first(self, n: int) -> _Part:
        """This part with only its first ``n`` models."""
        return dataclasses.replace(
            self,
            models=self.models[:n],
            starts=self.starts[:n],
            settings=self.settings[:n],
            labels=self.labels[:n],
        )


@dataclass(frozen=True)
class _Job:
    """One output tensor: the input tensors it merges and its parameter values."""

    name: str
    shape: tuple[int, ...]
    base: tuple[_Input, str] | None
    models: tuple[tuple[_Input, str], ...]
    values: dict[str, Any]
    flags: dict[str, Any]


class HostMerge:
    """A request's merge, checked for the host executor; ``self.declined`` says why not."""

    def __init__(self, req: MergeRequest, seed: int, vocabulary: Vocabulary | None = None):
        self.req, self.seed, self.voc = req, seed, vocabulary
        self.method = get_method(req.method)
        if req.slices is None:
            check_input_count(self.method, len(req.models), req.base is not None)
        for s in req.slices or []:
            n = len([i for i in range(len(s.models)) if i != s.base])
            check_input_count(self.method, n, s.base is not None, f"{s.where}: ")
        self.inputs: list[_Input] = []
        self.declined: str | None = None
        opened: dict[Path, _Input] = {}

        def get(path: Path) -> _Input:  # each model opened once, however many slices read it
            if path.resolve() not in opened:
                opened[path.resolve()] = _open(path)
            return opened[path.resolve()]

        try:
            self.base = None if req.base is None else get(req.base)
            first = req.models[0] if req.slices is None else req.slices[0].models[0]
            self.ref = self.base or get(first)  # whose config the output takes
            self.parts = self._parts(get)
        except DemError as e:  # the engine reports it (with its wording)
            self.declined = str(e)
            return
        finally:
            self.inputs = list(opened.values())
        self.declined = self._check()

    def _parts(self, get: Callable[[Path], _Input]) -> list[_Part]:
        req, chain = self.req, tuple(settings_chain(self.req.parameters))
        if req.slices is None:
            models = tuple(get(p) for p in req.models)
            return [
                _Part(
                    "models",
                    0,
                    self.ref.config.num_layers,
                    self.base,
                    0,
                    models,
                    (0,) * len(models),
                    tuple(req.model_parameters),
                    tuple(str(p) for p in req.models),
                    chain,
                )
            ]
        parts, offset = [], 0
        for s in req.slices:
            keep = [i for i in range(len(s.models)) if i != s.base]
            length = s.layer_ranges[0][1] - s.layer_ranges[0][0]
            parts.append(
                _Part(
                    s.where,
                    offset,
                    length,
                    None if s.base is None else get(s.models[s.base]),
                    0 if s.base is None else s.layer_ranges[s.base][0],
                    tuple(get(s.models[i]) for i in keep),
                    tuple(s.layer_ranges[i][0] for i in keep),
                    tuple(s.model_parameters[i] for i in keep),
                    tuple(str(s.models[i]) for i in keep),
                    (s.parameters, *chain),
                )
            )
            offset += length
        return parts

    def _check(self) -> str | None:
        ref, slices = self.ref, self.req.slices is not None
        stored = {x.config.param_dtype for x in self.inputs}
        if "?" in stored:
            return "an input's embedding is not float32, bfloat16 or float16"

        def same(c):  # vocabularies may differ when they are re-indexed; depths in slices
            c = c.replace(vocab_size=1) if self.voc is not None else c
            if slices:
                c = c.replace(num_layers=1, sliding_windows=None)
            return c.replace(param_dtype="float32", dtype="float32")

        if any(same(x.config) != same(ref.config) for x in self.inputs):
            return "the models' configs differ (the JAX engine checks them)"
        for x in self.inputs:
            names = {n for t in tensor_maps(x.config) for n in hf_names(t, x.config)}
            if set(x.ckpt.keys()) != names:
                return f"{x.label} holds other tensors than a {x.config.architecture} has"
        self.config, self.hf_config = ref.config, ref.hf_config
        if slices:
            windows = []
            for p in self.parts:
                for x, start in p.sources():
                    if start + p.length > x.config.num_layers:
                        return f"{p.where}: a layer range lies outside {x.label}"
                src, start = p.sources()[0]  # its base, else its first model
                own = src.config.sliding_windows or (None,) * src.config.num_layers
                windows += own[start : start + p.length]
            if len({w for w in windows if w is not None}) > 1:
                return "the layers taken slide through windows of different sizes"
            self.config = ref.config.replace(
                num_layers=len(windows), sliding_windows=tuple(windows)
            )
            try:
                self.hf_config = with_layers(ref.hf_config, self.config)
            except DemError as e:
                return str(e)
        if self.voc is not None:  # the merged model's vocabulary (mergekit writes it too)
            self.config = self.config.replace(vocab_size=self.voc.size)
            self.hf_config = {**self.hf_config, "vocab_size": self.voc.size}
        promoted = stored.pop() if len(stored) == 1 else "float32"  # as jnp.promote_types
        self.out_dtype = self.req.out_dtype or self.req.dtype or promoted
        self.jobs = list(self._plan())  # every parameter resolved (and checked) up front
        for job in self.jobs:
            reads = [*([job.base] if job.base else []), *job.models]
            skip = 1 if self.voc is not None and job.name in VOCAB_TENSORS else 0  # rows
            for x, n in reads:
                if x.ckpt.code(n) not in _FLOATS or x.ckpt.shape(n)[skip:] != job.shape[skip:]:
                    return f"{x.label}: tensor {n} differs in shape or is not a float"
        return None

    def _plan(self) -> Iterator[_Job]:
        """Every output tensor in export order, with what it reads and its values."""
        experts, parts = self.config.num_experts, self.parts
        for t in tensor_maps(self.config):
            for i in slices_of(t, len(parts)):
                part = parts[i]
                if self.req.slices is not None and not t.stacked and t.path[0] != "embed":
                    first, last = self.req.slices[0], self.req.slices[-1]
                    n = final_inputs(len(first.models), len(last.models), last.base, last.where)
                    check_input_count(self.method, n, part.base is not None, f"{last.where}: ")
                    part = part.first(n)
                n = part.length if t.stacked else 1
                names, ts = layer_names_and_ts(t, n, experts, part.offset)
                own = [layer_names_and_ts(t, n, experts, s)[0] for s in part.starts]
                base = part.base and layer_names_and_ts(t, n, experts, part.base_start)[0]
                values = resolve_values(
                    self.method, names, ts, part.chain, part.settings, part.labels, own
                )
                for k, name in enumerate(names):
                    reads = tuple((x, o[k]) for x, o in zip(part.models, own, strict=True))
                    first_read = (part.base, base[k]) if part.base else reads[0]
                    shape = tuple(first_read[0].ckpt.shape(first_read[1]))
                    if self.voc is not None and name in VOCAB_TENSORS:
                        shape = (self.voc.size, *shape[1:])
                    yield _Job(
                        name,
                        shape,
                        (part.base, base[k]) if part.base else None,
                        reads,
                        *_tensor_values(self.method, values, k),
                    )

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

    def _merge(self, job: _Job) -> np.ndarray:
        if self.voc is not None and job.name in VOCAB_TENSORS:
            base, xs = self._aligned(job)
        else:
            base = None if job.base is None else self._read(*job.base)
            xs = [self._read(x, n) for x, n in job.models]
        rng = tensor_rng(self.seed, job.name) if self.method.random else None
        out = KERNELS[self.method.name](base, xs, job.values, job.flags, rng)
        del base, xs
        if self.out_dtype == "bfloat16":
            return hk.f32_to_bf16(out)  # the bits, written as BF16 (see write)
        return out.astype(self.out_dtype, copy=False)

    def _aligned(self, job: _Job):
        """A vocabulary tensor of every input, re-indexed to the output's tokens: (base,
        models), read once per distinct input, in mergekit's order (the YAML's models,
        then an unlisted base) for the rows made from several inputs."""
        order = {x.path: (x, n) for x, n in job.models}
        if job.base is not None:
            order.setdefault(job.base[0].path, job.base)
        rows = align_rows(self.voc, [(p, self._read(*read)) for p, read in order.items()])
        aligned = dict(zip(order, rows, strict=True))
        base = None if job.base is None else aligned[job.base[0].path]
        return base, [aligned[x.path].copy() for x, _ in job.models]

    # -- the whole merge

    def write(self, out, overwrite: bool, max_shard_bytes: int, assets_dir, metadata) -> Path:
        """Merge into ``out`` (complete or absent), ``workers`` tensors at a time."""
        # bfloat16 as its uint16 bits with the BF16 code: no ml_dtypes (0.6 s to import)
        np_dtype, code = {
            "float32": (np.dtype(F32), None),
            "float16": (np.dtype(np.float16), None),
            "bfloat16": (np.dtype(np.uint16), "BF16"),
        }[self.out_dtype]
        specs = [TensorSpec(job.name, job.shape, np_dtype, code) for job in self.jobs]
        workers = max(1, min(len(os.sched_getaffinity(0)), 8))
        out_config = to_hf_config(self.config.replace(param_dtype=self.out_dtype), self.hf_config)
        with atomic_directory(out, overwrite) as tmp:
            desc = f"merging into {storage.path(out).name}"
            writer = hf_writer(tmp, specs, max_shard_bytes, desc)
            with writer, ThreadPoolExecutor(workers) as pool:
                pending: collections.deque = collections.deque()
                for job in self.jobs:
                    pending.append((job.name, pool.submit(self._merge, job)))
                    if len(pending) > workers:  # bounded: a few tensors in memory
                        name, fut = pending.popleft()
                        writer.write(name, fut.result())
                while pending:
                    name, fut = pending.popleft()
                    writer.write(name, fut.result())
            finish_hf_directory(tmp, out_config, assets_dir or self.ref.path, metadata)
        return storage.path(out)


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
        if req.slices is not None:  # as the JAX slice engine records them
            metadata["merge"]["slices"] = [
                [
                    {"model": str(p), "layer_range": list(r)}
                    for p, r in zip(s.models, s.layer_ranges, strict=True)
                ]
                for s in req.slices
            ]
        if config_yaml is not None:
            metadata["merge"]["config_yaml"] = config_yaml
        return plan.write(out, overwrite, max_shard_bytes, assets_dir, metadata)
    finally:
        if plan is not None:
            plan.close()
