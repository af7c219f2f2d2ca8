"""Where the merge engine's input leaves come from: a model or vector in memory, or a
directory read one leaf at a time (Orbax restores one leaf; a Hugging Face
directory reads that leaf's tensors), so streaming merges never hold whole inputs."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError, first_line
from dem_jax.io import storage
from dem_jax.io.hf.config import from_hf_config
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint
from dem_jax.io.hf.weights import TensorMap, block_tensors, check_checkpoint, tensor_maps
from dem_jax.io.modeldir import HF_CONFIG, Model, model_format
from dem_jax.io.models import load_model
from dem_jax.io.orbax import read_metadata
from dem_jax.io.storage import read_json
from dem_jax.io.tree import get_leaf, set_leaf
from dem_jax.model.transformer import param_shapes
from dem_jax.vectors.store import PARAMS_DIR, is_vector_dir, load_vector, vector_config
from dem_jax.vectors.vector import Vector, describe


class Source:
    """A model or vector whose leaves can be read one at a time."""

    label: str
    config: ModelConfig
    is_vector: bool = False
    hf_config: dict | None = None
    assets_dir: Path | None = None

    def read(self, tmap: TensorMap, sharding, layers: tuple[int, int] | None = None) -> jax.Array:
        """One leaf, on ``sharding``; of a stacked leaf only layers ``[start, end)`` when
        ``layers`` is given (an output slice's share of this model)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


class MemorySource(Source):
    def __init__(self, item: Model | Vector, label: str):
        self.label, self.config, self.params = label, item.config, item.params
        self.is_vector = isinstance(item, Vector)
        if isinstance(item, Model):
            self.hf_config, self.assets_dir = item.hf_config, item.assets_dir

    def read(self, tmap, sharding, layers=None):
        x = _layers(get_leaf(self.params, tmap.path), tmap, layers)
        return x if x.sharding == sharding else jax.device_put(x, sharding)


class OrbaxSource(Source):
    """A dem-jax model or vector directory; one leaf restored per read."""

    def __init__(self, directory: Path, label: str, is_vector: bool):
        self.label, self.is_vector = label, is_vector
        if is_vector:
            self.config = vector_config(directory)
        else:
            meta = read_metadata(directory)
            self.config = ModelConfig.from_dict(meta["model"], where=str(directory))
            self.hf_config, self.assets_dir = meta.get("hf_config"), directory
        self.params_dir = (directory / PARAMS_DIR).absolute()
        try:
            tree = ocp.StandardCheckpointer().metadata(self.params_dir).item_metadata.tree
        except Exception as e:  # Orbax raises many types for unreadable checkpoints
            raise DemError(
                f"{self.params_dir}: unreadable Orbax checkpoint ({first_line(e)})"
            ) from None
        shapes = param_shapes(self.config)
        self.dtypes = {}
        for tmap in tensor_maps(self.config):
            try:
                stored = get_leaf(tree, tmap.path)
            except (KeyError, TypeError):
                raise DemError(f"{self.params_dir}: missing parameter {describe(tmap)}") from None
            want = tuple(get_leaf(shapes, tmap.path).shape)
            if tuple(stored.shape) != want:
                raise DemError(
                    f"{self.params_dir}: parameter {describe(tmap)} has shape "
                    f"{list(stored.shape)}, its config implies {list(want)}"
                )
            self.dtypes[tmap.path] = stored.dtype
        self._ckptr = ocp.PyTreeCheckpointer()

    def read(self, tmap, sharding, layers=None):
        if layers is not None and tmap.stacked:  # Orbax restores whole leaves
            x = _layers(self.read(tmap, sharding), tmap, layers)
            return jax.device_put(x, sharding)
        shape = tuple(get_leaf(param_shapes(self.config), tmap.path).shape)
        target: dict = {}
        set_leaf(
            target,
            tmap.path,
            jax.ShapeDtypeStruct(shape, self.dtypes[tmap.path], sharding=sharding),
        )
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        try:
            return get_leaf(self._ckptr.restore(self.params_dir, args=args), tmap.path)
        except Exception as e:  # Orbax raises many types for corrupt data
            raise DemError(
                f"{self.params_dir}: cannot read {describe(tmap)} ({first_line(e)})"
            ) from None


class HFSource(Source):
    """A Hugging Face directory; each read loads one leaf's tensors (all its layers, or
    a slice's)."""

    def __init__(self, directory, label: str):
        self.label, self.assets_dir = label, directory
        self.hf_config = read_json(directory / HF_CONFIG)
        self.ckpt = SafetensorsCheckpoint(directory)
        config = from_hf_config(self.hf_config, str(directory / HF_CONFIG))
        if "model.embed_tokens.weight" not in self.ckpt:
            raise DemError(f"{directory}: missing tensor model.embed_tokens.weight")
        stored = str(jnp.dtype(self.ckpt.dtype("model.embed_tokens.weight")))
        self.config = config.replace(param_dtype=stored, dtype=stored)
        check_checkpoint(self.ckpt, self.config, str(directory))

    def read(self, tmap, sharding, layers=None):
        shape = tuple(get_leaf(param_shapes(self.config), tmap.path).shape)
        first = 0
        if layers is not None and tmap.stacked:  # only the slice's layers are read
            first, shape = layers[0], (layers[1] - layers[0], *shape[1:])
        dtype = np.dtype(jnp.dtype(self.config.param_dtype))
        cache: dict[str, np.ndarray] = {}  # each tensor read once, whatever the sharding

        def tensor(name, layer_shape):
            if name not in cache:
                t = self.ckpt.read(name)
                t = t.T if tmap.transpose else t
                cache[name] = np.asarray(t).reshape(layer_shape).astype(dtype, copy=False)
            return cache[name]

        def callback(index):
            if not tmap.depth:
                return tensor(tmap.hf_name, shape)[index]
            # one HF tensor per (layer[, expert]) in this device's block
            counts, names, inner = block_tensors(tmap, shape, index, first)
            block = np.stack([tensor(n, shape[tmap.depth :])[inner] for n in names])
            return block.reshape(*counts, *block.shape[1:])

        array = jax.make_array_from_callback(shape, sharding, callback)
        # Unmap the files: pages read through a live mapping count in this process's
        # resident set, which would grow to every input's full size (the next read
        # maps them again).
        self.ckpt.close()
        return array

    def close(self):
        self.ckpt.close()


def _layers(x: jax.Array, tmap: TensorMap, layers: tuple[int, int] | None) -> jax.Array:
    """Layers ``[start, end)`` of a stacked leaf (all of it when ``layers`` is None)."""
    return x if layers is None or not tmap.stacked else x[layers[0] : layers[1]]


def open_source(item, label: str, mesh: Mesh | None, streaming: bool) -> Source:
    """A leaf source for a Model, a Vector or a directory (HF, dem-jax model or vector)."""
    if isinstance(item, Model | Vector):
        return MemorySource(item, label)
    if not isinstance(item, str | os.PathLike):
        raise DemError(f"{label}: expected a model, a vector or a path, got {type(item).__name__}")
    path = storage.path(item)
    if is_vector_dir(path):
        return (
            OrbaxSource(path, label, True)
            if streaming
            else MemorySource(load_vector(path, mesh), label)
        )
    fmt = model_format(path)
    if not streaming:
        return MemorySource(load_model(path, mesh=mesh), label)
    return HFSource(path, label) if fmt == "hf" else OrbaxSource(path, label, False)
