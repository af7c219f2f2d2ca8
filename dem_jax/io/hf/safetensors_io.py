"""Reading and writing the safetensors format with numpy alone.

A safetensors file is an 8-byte little-endian header length ``N``, then ``N``
bytes of JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the end of the header)
plus an optional ``"__metadata__"`` dict of str -> str, then the raw
little-endian tensor bytes.

We implement it ourselves rather than use ``safetensors.numpy`` because that
API cannot hand out bfloat16 (numpy has no such dtype; we use ml_dtypes), it
always reads a tensor whole (we need slices of a shard-sized block), and it
only writes a dict of arrays held in memory at once (we stream a model out one
tensor at a time). Files we write are read by the official library and vice
versa; the tests check both directions.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage

# Every dtype is pinned to little-endian, as the format requires, so a memmap
# view of the file reads correct values whatever the host byte order.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}

_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

# The official implementation refuses larger headers; a bigger value means the
# file is not safetensors (e.g. a renamed pickle) and we must not read gigabytes
# of it as JSON.
MAX_HEADER_BYTES = 100_000_000

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
# transformers' shard naming; used to recognise shards left by an earlier save.
_SHARD_NAME_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

DEFAULT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})


def dtype_code(dtype: Any) -> str:
    """Return the safetensors dtype code (e.g. ``"BF16"``) for a numpy dtype-like.

    Big-endian dtypes map to the same code as their little-endian twin because
    the writer byte-swaps them. Raises :class:`DemError` for dtypes the format
    cannot hold (complex, strings, objects, ...).
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DemError(f"dtype {dtype!r} is not a numpy dtype: {exc}") from None
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    code = _CODES.get(dt)
    if code is None:
        supported = ", ".join(str(d) for d in DTYPES.values())
        raise DemError(f"dtype {dt} cannot be stored in safetensors (supported: {supported})")
    return code


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lives inside a file's data section."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(value: Any) -> bool:
    # JSON booleans are Python bools, which are ints; a shape of [true] is garbage.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicate_keys(path: Path) -> Any:
    """A json object_pairs_hook: duplicate tensor names would silently drop one tensor."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DemError(f"{path}: header names {key!r} twice")
            out[key] = value
        return out

    return hook


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed eagerly, tensor bytes read on demand.

    Tensor data is reached through a single read-only ``np.memmap`` opened on the
    first :meth:`read` and reused, so reading a slice touches only the pages
    that hold it. Every read returns an owned copy, so nothing handed out keeps
    the mapping alive or changes if the file does.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` and validate its header; raises :class:`DemError` if malformed."""
        self.path = storage.path(path)
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, _TensorInfo] = {}
        self._mm: np.memmap | None = None
        self._parse_header()

    def _parse_header(self) -> None:
        path = self.path
        try:
            size = storage.file_size(path)
            with path.open("rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise DemError(
                        f"{path}: file too short ({size} bytes) to be safetensors "
                        "(needs an 8-byte header length)"
                    )
                header_len = int.from_bytes(prefix, "little")
                if header_len > MAX_HEADER_BYTES:
                    raise DemError(
                        f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes; "
                        "not a safetensors file"
                    )
                if 8 + header_len > size:
                    raise DemError(
                        f"{path}: header length {header_len} runs past the end of the "
                        f"{size}-byte file (truncated or not safetensors)"
                    )
                raw = fh.read(header_len)
        except FileNotFoundError:
            raise DemError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise DemError(f"{path}: is a directory, not a safetensors file") from None
        except PermissionError as exc:
            raise DemError(f"{path}: cannot read: {exc.strerror}") from None

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys(path))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise DemError(f"{path}: header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise DemError(f"{path}: header is a JSON {type(header).__name__}, expected an object")

        self._data_start = 8 + header_len
        data_size = size - self._data_start
        metadata = header.pop("__metadata__", None)
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                isinstance(v, str) for v in metadata.values()
            ):
                raise DemError(f"{path}: __metadata__ must be an object of string values")
            self.metadata = dict(metadata)

        for name, entry in header.items():
            self._tensors[name] = self._parse_entry(name, entry, data_size)

        # Overlapping tensors mean a corrupt header: writing one would clobber another.
        ordered = sorted(self._tensors.items(), key=lambda item: (item[1].begin, item[1].end))
        prev_end, prev_name = 0, None
        for name, info in ordered:
            if info.begin < prev_end:
                raise DemError(
                    f"{path}: tensor {name!r}: bytes [{info.begin}, {info.end}) overlap "
                    f"tensor {prev_name!r}"
                )
            if info.end > info.begin:
                prev_end, prev_name = info.end, name
        self._order = [name for name, _ in ordered]

    def _parse_entry(self, name: str, entry: Any, data_size: int) -> _TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise DemError(f"{where}: header entry is not an object")
        missing = {"dtype", "shape", "data_offsets"} - entry.keys()
        if missing:
            raise DemError(f"{where}: header entry lacks {', '.join(sorted(missing))}")
        code = entry["dtype"]
        if code not in DTYPES:
            raise DemError(f"{where}: unsupported dtype {code!r} (supported: {', '.join(DTYPES)})")
        dtype = DTYPES[code]
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise DemError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
        ):
            raise DemError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if begin > end or end > data_size:
            raise DemError(
                f"{where}: data_offsets [{begin}, {end}] fall outside the {data_size}-byte "
                "data section (file truncated or header corrupt)"
            )
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise DemError(
                f"{where}: data_offsets span {end - begin} bytes but {code} shape {shape} "
                f"needs {expected}"
            )
        return _TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise DemError(f"{self.path}: no tensor named {name!r}") from None

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        """Whether the file holds a tensor called ``name``."""
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        """Iterate over tensor names in file order."""
        return iter(self._order)

    def __len__(self) -> int:
        """Number of tensors in the file."""
        return len(self._order)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self._info(name).shape

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor ``name`` (ml_dtypes for bfloat16 / float8)."""
        return self._info(name).dtype

    def nbytes(self, name: str) -> int:
        """Size in bytes of tensor ``name``'s data."""
        info = self._info(name)
        return info.end - info.begin

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Read tensor ``name``, or the sub-block ``index`` of it, as an owned C-contiguous array.

        ``index`` is ``None`` for the whole tensor or a tuple of step-1 slices
        (at most one per axis; missing trailing axes are taken whole), with
        numpy's slicing semantics. Only the bytes the block covers are read.
        """
        info = self._info(name)
        if index is not None:
            index = self._check_index(name, index, info.shape)
        if info.end == info.begin:
            # Nothing to read; also avoids mapping the file for empty tensors.
            full = np.zeros(info.shape, dtype=info.dtype)
        elif storage.is_url(self.path):
            return self._read_remote(info, index)
        else:
            mm = self._memmap()
            start = self._data_start + info.begin
            full = mm[start : self._data_start + info.end].view(info.dtype).reshape(info.shape)
        block = full if index is None else full[index]
        # np.array(copy=True) gives a plain ndarray that owns its data: callers may
        # keep or mutate it without pinning or aliasing the mapping.
        return np.array(block, copy=True, order="C")

    def _read_remote(self, info: _TensorInfo, index: tuple[slice, ...] | None) -> np.ndarray:
        """Object stores have no memory map: fetch only the rows the block covers."""
        n0 = info.shape[0] if info.shape else 1
        row_bytes = (info.end - info.begin) // n0
        rows = range(n0)
        if index and info.shape:
            rows = range(*index[0].indices(n0))
            index = (slice(None), *index[1:])
        start = self._data_start + info.begin + rows.start * row_bytes
        data = storage.read_range(self.path, start, start + len(rows) * row_bytes)
        shape = (len(rows), *info.shape[1:]) if info.shape else ()
        block = np.frombuffer(data, dtype=info.dtype).reshape(shape)
        return np.array(block if index is None else block[index], copy=True, order="C")

    def _check_index(self, name: str, index: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
        where = f"{self.path}: tensor {name!r}"
        if isinstance(index, slice):
            index = (index,)
        if not isinstance(index, tuple):
            raise DemError(f"{where}: index must be a tuple of slices, got {index!r}")
        if len(index) > len(shape):
            raise DemError(
                f"{where}: index has {len(index)} slices but the tensor has shape {shape}"
            )
        for axis, (sl, dim) in enumerate(zip(index, shape, strict=False)):
            if not isinstance(sl, slice):
                raise DemError(f"{where}: index entry {axis} is {sl!r}, expected a slice")
            try:
                step = sl.indices(dim)[2]
            except (TypeError, ValueError) as exc:
                raise DemError(f"{where}: index entry {axis} {sl!r} is invalid: {exc}") from None
            if step != 1:
                raise DemError(f"{where}: index entry {axis} {sl!r} must have step 1")
        return index

    def _memmap(self) -> np.memmap:
        if self._mm is None:
            try:
                self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            except OSError as exc:
                raise DemError(f"{self.path}: cannot map file: {exc}") from None
        return self._mm

    def close(self) -> None:
        """Drop the memory map; a later :meth:`read` reopens it."""
        # Reads return copies, so no array of ours references the mapping and
        # dropping the last reference unmaps it.
        self._mm = None

    def __enter__(self) -> SafetensorsFile:
        """Use as a context manager that closes the file on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the file."""
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._tensors)} tensors)"


class SafetensorsCheckpoint:
    """A Hugging Face weights directory: model.safetensors, or a sharded set with
    model.safetensors.index.json (its "weight_map" maps tensor -> file), or
    (fallback) all *.safetensors files in the directory.

    Headers of all files are parsed up front (cheap: a few kilobytes each);
    tensor data is read lazily through each file's memory map.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Locate and open the weight files in ``directory``; raises :class:`DemError` if none."""
        self.directory = storage.path(directory)
        if not self.directory.is_dir():
            raise DemError(f"{self.directory}: not a directory")
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}

        single = self.directory / SINGLE_FILE_NAME
        index = self.directory / INDEX_FILE_NAME
        # Same precedence as transformers: a lone model.safetensors wins over an index.
        if single.is_file():
            paths = [single]
            weight_map = None
        elif index.is_file():
            weight_map = self._read_index(index)
            paths = sorted({self.directory / f for f in weight_map.values()})
            for p in paths:
                if not p.is_file():
                    raise DemError(f"{index}: weight_map points to missing file {p.name!r}")
        else:
            paths = sorted(p for p in self.directory.glob("*.safetensors") if p.is_file())
            weight_map = None
        if not paths:
            others = sorted(
                p.name for p in self.directory.iterdir() if p.suffix in {".bin", ".pt", ".pth"}
            )
            found = f" (found {', '.join(others)})" if others else ""
            raise DemError(
                f"{self.directory}: no safetensors weights{found}; PyTorch .bin/.pt weights are "
                "not supported, convert them to safetensors first (e.g. transformers "
                "save_pretrained(..., safe_serialization=True))"
            )

        for p in paths:
            f = SafetensorsFile(p)
            self._files[p] = f
            for name in f:
                if name in self._where:
                    raise DemError(
                        f"{self.directory}: tensor {name!r} is in both "
                        f"{self._where[name].path.name} and {p.name}"
                    )
                self._where[name] = f
        if weight_map is not None:
            for name, fname in weight_map.items():
                holder = self._where.get(name)
                if holder is None or holder.path != self.directory / fname:
                    raise DemError(
                        f"{index}: weight_map says tensor {name!r} is in {fname}, "
                        "but that file does not hold it"
                    )

    @staticmethod
    def _read_index(index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DemError(f"{index}: not valid JSON ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise DemError(f'{index}: lacks a "weight_map" object of tensor -> file name')
        return weight_map

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise DemError(f"{self.directory}: no tensor named {name!r}") from None

    @property
    def files(self) -> list[Path]:
        """Paths of the weight files, in sorted order."""
        return list(self._files)

    @property
    def total_bytes(self) -> int:
        """Total tensor data bytes over all files (the index's ``total_size``)."""
        return sum(f.nbytes(n) for f in self._files.values() for n in f)

    def keys(self) -> list[str]:
        """Tensor names, file by file, each file in data-offset order."""
        return [n for f in self._files.values() for n in f]

    def __contains__(self, name: object) -> bool:
        """Whether some file holds a tensor called ``name``."""
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        """Iterate over tensor names in :meth:`keys` order."""
        return iter(self.keys())

    def __len__(self) -> int:
        """Number of tensors over all files."""
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor ``name``."""
        return self._file(name).dtype(name)

    def nbytes(self, name: str) -> int:
        """Size in bytes of tensor ``name``'s data."""
        return self._file(name).nbytes(name)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Read tensor ``name`` (or a block of it); see :meth:`SafetensorsFile.read`."""
        return self._file(name).read(name, index)

    def close(self) -> None:
        """Close every file's memory map."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> SafetensorsCheckpoint:
        """Use as a context manager that closes the files on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the files."""
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written, known before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

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
    if not _is_int(max_shard_bytes) or max_shard_bytes <= 0:
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
            "dtype": dtype_code(spec.dtype),
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
    ) -> None:
        """Plan the shards of ``specs`` for ``directory`` (created if needed).

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
