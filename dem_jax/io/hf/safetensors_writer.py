"""Writing safetensors files: a model streamed out one tensor at a time.

:func:`plan_shards` splits the tensors (known by :class:`TensorSpec` before
their data exists) into shards; :class:`ShardedSafetensorsWriter` writes each
shard's header up front, appends tensors as they arrive and writes the index,
as transformers' ``save_pretrained`` lays them out. The format itself is
described in :mod:`dem_jax.io.hf.safetensors_format`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.safetensors_format import (
    INDEX_FILE_NAME,
    ITEMSIZE,
    SINGLE_FILE_NAME,
    dtype_code,
    is_int,
)
from dem_jax.io.progress_bar import progress_bar

# transformers' shard naming; used to recognise shards left by an earlier save.
_SHARD_NAME_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

DEFAULT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written, known before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    # The safetensors code when ``dtype`` only carries the bits: "BF16" with uint16
    # arrays writes bfloat16 without importing ml_dtypes (the host merge executor).
    code: str | None = None

    def __post_init__(self) -> None:
        """Normalise shape to a tuple of ints and dtype to ``np.dtype``; validate both."""
        # Frozen dataclass: normalise through object.__setattr__ so callers may
        # pass lists and dtype-likes yet get hashable, comparable specs.
        if not isinstance(self.name, str) or not self.name or self.name == "__metadata__":
            raise DemError(f"tensor name {self.name!r} is not allowed in safetensors")
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise DemError(f"tensor {self.name!r}: shape {shape} has a negative dimension")
        object.__setattr__(self, "shape", shape)
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise DemError(f"tensor {self.name!r}: {self.dtype!r} is not a numpy dtype") from None
        if dtype.byteorder == ">":
            # The file is little-endian whatever the source; write() swaps the data.
            dtype = dtype.newbyteorder("<")
        try:
            dtype_code(dtype)  # fail now, not halfway through a multi-gigabyte write
        except DemError as exc:
            raise DemError(f"tensor {self.name!r}: {exc}") from None
        if self.code is not None and ITEMSIZE.get(self.code) != dtype.itemsize:
            raise DemError(f"tensor {self.name!r}: code {self.code!r} does not fit {dtype}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` into consecutive shards of at most ``max_shard_bytes`` data bytes.

    Greedy in the given order: a new shard starts when adding the next tensor
    would exceed the limit. A tensor larger than the limit gets a shard of its
    own. Returns ``[]`` for no specs.
    """
    if not is_int(max_shard_bytes) or max_shard_bytes <= 0:
        raise DemError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def _header_bytes(shard: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix plus JSON header (space-padded to 8 bytes) of one shard."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": spec.code or dtype_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Padding keeps the data section 8-byte aligned in the file, as the
    # official writer does, so mmapped tensors can be aligned.
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class ShardedSafetensorsWriter:
    """Streams tensors to disk one at a time, in the planned order, so a model is
    never held in memory whole. Because every shape is known up front, each
    shard's header is written first and tensors are appended as they arrive.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        specs: list[TensorSpec],
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping[str, str] | None = DEFAULT_METADATA,
        progress: str | None = None,
    ) -> None:
        """Plan the shards of ``specs`` for ``directory`` (created if needed).

        ``progress``: a label for a progress bar over the bytes written (none if None).

        One shard is written as ``model.safetensors`` with no index, as
        transformers does; several as ``model-00001-of-0000N.safetensors``
        plus ``model.safetensors.index.json``. ``metadata`` (str -> str, or
        ``None`` for none) goes into every shard's ``__metadata__``.

        Shards are written under ``<name>.partial`` and renamed by
        :meth:`close` only once every tensor has arrived, so an interrupted
        export never leaves files that look complete.
        """
        self.directory = storage.path(directory)
        self._specs = list(specs)
        seen: set[str] = set()
        for spec in self._specs:
            if not isinstance(spec, TensorSpec):
                raise DemError(f"specs must be TensorSpec objects, got {spec!r}")
            if spec.name in seen:
                raise DemError(f"tensor {spec.name!r} appears twice in the write plan")
            seen.add(spec.name)
        if metadata is not None:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise DemError(f"safetensors metadata must map str -> str, got {dict(metadata)!r}")
            metadata = dict(metadata)
        self._metadata = metadata
        # An empty model still gets a (tensor-less) model.safetensors.
        self._shards = plan_shards(self._specs, max_shard_bytes) or [[]]
        n = len(self._shards)
        if n == 1:
            self._names = [SINGLE_FILE_NAME]
        else:
            self._names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = [i for i, shard in enumerate(self._shards) for _ in shard]
        try:
            storage.makedirs(self.directory)
        except OSError as exc:
            raise DemError(f"{self.directory}: cannot create output directory: {exc}") from None
        self._pos = 0  # index into self._specs of the next tensor expected
        self._fh: BinaryIO | None = None
        self._opened = 0  # shards whose .partial file has been created
        self._closed = False
        total = sum(s.nbytes for s in self._specs)
        self._bar = progress_bar(total, progress or "", enabled=progress is not None)

    @property
    def files(self) -> list[str]:
        """File names (relative to the directory) of the shards, in order."""
        return list(self._names)

    def _partial(self, i: int) -> Any:
        # An object-store upload becomes visible only when complete: no .partial needed.
        if storage.is_url(self.directory):
            return self.directory / self._names[i]
        return self.directory / (self._names[i] + ".partial")

    def _open_shard(self, i: int) -> None:
        path = self._partial(i)
        try:
            self._fh = path.open("wb")
            self._opened = i + 1
            self._fh.write(_header_bytes(self._shards[i], self._metadata))
        except OSError as exc:
            raise DemError(f"{path}: cannot write: {exc}") from None

    def _finish_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def write(self, name: str, array: Any) -> None:
        """Append tensor ``name``, which must be the next one in plan order.

        ``array`` is anything ``np.asarray`` accepts (numpy, jax). Its shape
        and dtype must match the plan exactly: we never cast silently, as a
        wrong dtype here means a bug upstream. Big-endian input is byte-swapped.
        """
        if self._closed:
            raise DemError(f"{self.directory}: writer is closed; cannot write tensor {name!r}")
        if self._pos >= len(self._specs):
            raise DemError(
                f"{self.directory}: tensor {name!r}: every planned tensor is already written"
            )
        spec = self._specs[self._pos]
        if name != spec.name:
            if any(s.name == name for s in self._specs):
                raise DemError(
                    f"{self.directory}: tensor {name!r} written out of order; "
                    f"expected {spec.name!r} next"
                )
            raise DemError(f"{self.directory}: tensor {name!r} is not in the write plan")
        arr = np.asarray(array)
        if arr.shape != spec.shape:
            raise DemError(
                f"{self.directory}: tensor {name!r} has shape {arr.shape}, planned {spec.shape}"
            )
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype != spec.dtype:
            raise DemError(
                f"{self.directory}: tensor {name!r} has dtype {arr.dtype}, planned {spec.dtype}"
            )
        shard = self._shard_of[self._pos]
        if self._fh is None:
            self._open_shard(shard)
        # A flat uint8 view of a contiguous array writes the same bytes as
        # tobytes() without a second full-size copy of a large tensor.
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        assert self._fh is not None
        try:
            self._fh.write(data)
        except OSError as exc:
            raise DemError(f"{self._partial(shard)}: cannot write tensor {name!r}: {exc}") from None
        self._bar.update(self._specs[self._pos].nbytes)
        self._pos += 1
        if self._pos == len(self._specs) or self._shard_of[self._pos] != shard:
            self._finish_shard()

    def close(self) -> None:
        """Finish the export: rename shards into place and write the index.

        Raises :class:`DemError` (after deleting the partial files) if some
        planned tensors were never written. Stale ``model*.safetensors`` files
        and index from an earlier save into the same directory are removed, as
        transformers' ``save_pretrained`` does, so loaders cannot mix the two.
        Calling it again is a no-op.
        """
        if self._closed:
            return
        if self._pos < len(self._specs):
            missing = [s.name for s in self._specs[self._pos :]]
            self.abort()
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DemError(
                f"{self.directory}: closed before writing {len(missing)} planned "
                f"tensor(s): {shown}{more}"
            )
        self._finish_shard()
        self._bar.close()
        if self._opened == 0:  # the tensor-less model: nothing triggered the open
            self._open_shard(0)
            self._finish_shard()
        self._closed = True
        for i, name in enumerate(self._names):
            if self._partial(i) != self.directory / name:
                os.replace(self._partial(i), self.directory / name)
        index = self.directory / INDEX_FILE_NAME
        if len(self._names) > 1:
            weight_map = {
                s.name: self._names[i] for s, i in zip(self._specs, self._shard_of, strict=True)
            }
            total = sum(s.nbytes for s in self._specs)
            text = json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map},
                indent=2,
                sort_keys=True,
            )
            storage.write_text(index, text + "\n")
        self._remove_stale()

    def _remove_stale(self) -> None:
        ours = set(self._names)
        if len(self._names) > 1:
            ours.add(INDEX_FILE_NAME)
        for p in self.directory.iterdir():
            is_weights = p.name in {SINGLE_FILE_NAME, INDEX_FILE_NAME} or _SHARD_NAME_RE.fullmatch(
                p.name
            )
            if is_weights and p.name not in ours and p.is_file():
                p.unlink()

    def abort(self) -> None:
        """Stop without producing output: close and delete the partial files."""
        self._finish_shard()
        self._bar.close()
        self._closed = True
        for i in range(self._opened):
            self._partial(i).unlink(missing_ok=True)

    def __enter__(self) -> ShardedSafetensorsWriter:
        """Use as a context manager: close on success, abort on an exception."""
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Close if the block succeeded; otherwise abort so the original error propagates."""
        if exc_type is None:
            self.close()
        else:
            self.abort()
