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

from typing import Any

import ml_dtypes
import numpy as np

from dem_jax.errors import DemError

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
    code = _CODES.get(dt)
    if code is None:
        supported = ", ".join(str(d) for d in DTYPES.values())
        raise DemError(f"dtype {dt} cannot be stored in safetensors (supported: {supported})")
    return code


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool."""
    # JSON booleans are Python bools, which are ints; a shape of [true] is garbage.
    return isinstance(value, int) and not isinstance(value, bool)
