"""The safetensors file format: its dtype codes and Hugging Face's file names.

A safetensors file is an 8-byte little-endian header length ``N``, then ``N``
bytes of JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the end of the header)
plus an optional ``"__metadata__"`` dict of str -> str, then the raw
little-endian tensor bytes.

We implement it ourselves, with numpy alone, rather than use
``safetensors.numpy`` because that API cannot hand out bfloat16 (numpy has no
such dtype; we use ml_dtypes), it always reads a tensor whole (we need slices
of a shard-sized block), and it only writes a dict of arrays held in memory at
once (we stream a model out one tensor at a time). Files we write are read by
the official library and vice versa; the tests check both directions.
:mod:`dem_jax.io.hf.safetensors_reader` reads files and checkpoint
directories; :mod:`dem_jax.io.hf.safetensors_writer` writes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from dem_jax.errors import DemError

# Every dtype is pinned to little-endian, as the format requires, so a memmap
# view of the file reads correct values whatever the host byte order.
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
# ml_dtypes' types by name: importing ml_dtypes costs 0.6 s, so only when one is used.
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
ITEMSIZE = {
    **{code: np.dtype(d).itemsize for code, d in _NUMPY_DTYPES.items()},
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_ORDER = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", *list(_NUMPY_DTYPES)[3:])


class _DtypeTable(Mapping[str, np.dtype]):
    """Safetensors code -> numpy dtype (ml_dtypes for bfloat16 and float8, imported on
    first use)."""

    def __getitem__(self, code: str) -> np.dtype:
        if code in _ML_DTYPES:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
        return np.dtype(_NUMPY_DTYPES[code])

    def __contains__(self, code: object) -> bool:  # without resolving (importing) it
        return code in _ORDER

    def __iter__(self) -> Iterator[str]:
        return iter(_ORDER)

    def __len__(self) -> int:
        return len(_ORDER)


DTYPES: Mapping[str, np.dtype] = _DtypeTable()
_CODES: dict[np.dtype, str] = {np.dtype(d): code for code, d in _NUMPY_DTYPES.items()}
_ML_CODES = {name: code for code, name in _ML_DTYPES.items()}

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"


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
    code = _CODES.get(dt) or (_ML_CODES.get(dt.name) if dt.type.__module__ == "ml_dtypes" else None)
    if code is None:
        supported = ", ".join(str(d) for d in DTYPES.values())
        raise DemError(f"dtype {dt} cannot be stored in safetensors (supported: {supported})")
    return code


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool."""
    # JSON booleans are Python bools, which are ints; a shape of [true] is garbage.
    return isinstance(value, int) and not isinstance(value, bool)
