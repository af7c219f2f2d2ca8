"""Reading safetensors files and Hugging Face weight directories, a block at a time.

:class:`SafetensorsFile` parses one file's header and reads a tensor, or a
slice of one, through a memory map (or ranged reads from an object store);
:class:`SafetensorsCheckpoint` does the same over ``model.safetensors`` or a
sharded set. The format itself is described in
:mod:`dem_jax.io.hf.safetensors_format`.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.hf.safetensors_format import (
    DTYPES,
    INDEX_FILE_NAME,
    ITEMSIZE,
    SINGLE_FILE_NAME,
    is_int,
)

# The official implementation refuses larger headers; a bigger value means the
# file is not safetensors (e.g. a renamed pickle) and we must not read gigabytes
# of it as JSON.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lives inside a file's data section."""

    code: str  # the safetensors dtype code
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.code]


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

    A whole tensor is read with ``pread`` into a new array; a block of one through a
    single read-only ``np.memmap`` opened on the first block read and reused, so
    reading a slice touches only the pages that hold it. Every read returns an owned
    copy, so nothing handed out keeps the mapping alive or changes if the file does.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` and validate its header; raises :class:`DemError` if malformed."""
        self.path = storage.path(path)
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, _TensorInfo] = {}
        self._mm: np.memmap | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
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
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise DemError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(is_int(o) and o >= 0 for o in offsets)
        ):
            raise DemError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if begin > end or end > data_size:
            raise DemError(
                f"{where}: data_offsets [{begin}, {end}] fall outside the {data_size}-byte "
                "data section (file truncated or header corrupt)"
            )
        expected = math.prod(shape) * ITEMSIZE[code]
        if end - begin != expected:
            raise DemError(
                f"{where}: data_offsets span {end - begin} bytes but {code} shape {shape} "
                f"needs {expected}"
            )
        return _TensorInfo(code=code, shape=tuple(shape), begin=begin, end=end)

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

    def code(self, name: str) -> str:
        """The safetensors dtype code of tensor ``name`` (``"BF16"``...)."""
        return self._info(name).code

    def nbytes(self, name: str) -> int:
        """Size in bytes of tensor ``name``'s data."""
        info = self._info(name)
        return info.end - info.begin

    def read(
        self, name: str, index: tuple[slice, ...] | None = None, *, raw: bool = False
    ) -> np.ndarray:
        """Read tensor ``name``, or the sub-block ``index`` of it, as an owned C-contiguous array.

        ``index`` is ``None`` for the whole tensor or a tuple of step-1 slices
        (at most one per axis; missing trailing axes are taken whole), with
        numpy's slicing semantics. Only the bytes the block covers are read.
        ``raw``: the whole tensor's bytes as unsigned integers of its item size
        (bfloat16 as uint16, without ml_dtypes).
        """
        info = self._info(name)
        if raw and index is not None:
            raise DemError(f"{self.path}: tensor {name!r}: a raw read takes the whole tensor")
        if raw or (index is None and not storage.is_url(self.path)):
            return self._read_whole(info, raw)
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

    def _read_whole(self, info: _TensorInfo, raw: bool) -> np.ndarray:
        """A whole tensor read into a new array (``pread``: no mapping, so reading
        a model tensor by tensor does not leave it resident in this process)."""
        dtype = np.dtype(f"<u{ITEMSIZE[info.code]}") if raw else info.dtype
        if storage.is_url(self.path):
            return self._read_remote(info, None).view(dtype)
        out = np.empty(info.shape, dtype)
        with self._lock:  # the host merge executor reads from several threads
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as exc:
                    raise DemError(f"{self.path}: cannot open file: {exc}") from None
        view = memoryview(out.reshape(-1).view(np.uint8))
        done, start = 0, self._data_start + info.begin
        while done < len(view):  # pread may return fewer bytes than asked
            n = os.preadv(self._fd, [view[done:]], start + done)
            if n <= 0:
                raise DemError(f"{self.path}: file ends inside tensor data (truncated?)")
            done += n
        return out

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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
        for name, fname in weight_map.items():
            if not _is_plain_file_name(fname):
                raise DemError(
                    f"{index}: weight_map puts tensor {name!r} in {fname!r}, which is not a "
                    "file name inside the model directory (no '/', '\\', ':', '..' or "
                    "absolute paths)"
                )
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

    def read(
        self, name: str, index: tuple[slice, ...] | None = None, *, raw: bool = False
    ) -> np.ndarray:
        """Read tensor ``name`` (or a block of it); see :meth:`SafetensorsFile.read`."""
        return self._file(name).read(name, index, raw=raw)

    def code(self, name: str) -> str:
        """The safetensors dtype code of tensor ``name``."""
        return self._file(name).code(name)

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


def _is_plain_file_name(name: str) -> bool:
    """Whether an index entry names a file directly inside the directory: a shard may
    not be looked for anywhere else (``../x``, ``/abs``, ``sub/x``, ``C:x``)."""
    return (
        bool(name)
        and name not in (".", "..")
        and not any(c in name for c in "/\\:\0")
        and not os.path.isabs(name)
    )
