"""Tests for dem_jax.io.hf.safetensors_{format,reader,writer}, checked against the official
safetensors library."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from dem_jax.errors import DemError
from dem_jax.io.hf.safetensors_format import DTYPES, dtype_code
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint, SafetensorsFile
from dem_jax.io.hf.safetensors_writer import ShardedSafetensorsWriter, TensorSpec, plan_shards

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bf16_tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def _bits_equal(ours: np.ndarray, theirs: torch.Tensor) -> bool:
    # bfloat16 has no exact float comparison across libraries; compare raw bits.
    return np.array_equal(ours.view(np.int16), theirs.view(torch.int16).numpy())


def _raw(a: np.ndarray) -> np.ndarray:
    # Byte-level equality: exact for every dtype, incl. NaNs and 0-d arrays.
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _sample_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "emb": rng.standard_normal((7, 5)).astype(np.float32),
        "bf": rng.standard_normal((3, 4, 6)).astype(BF16),
        "half": rng.standard_normal((9,)).astype(np.float16),
        "ids": rng.integers(-(2**40), 2**40, size=(4, 2), dtype=np.int64),
        "mask": rng.random((5,)) > 0.5,
        "small": rng.integers(-128, 127, size=(3,), dtype=np.int8),
        "scalar": np.array(1.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _write(directory: Path, arrays: dict[str, np.ndarray], **kwargs) -> ShardedSafetensorsWriter:
    specs = [TensorSpec(n, a.shape, a.dtype) for n, a in arrays.items()]
    with ShardedSafetensorsWriter(directory, specs, **kwargs) as writer:
        for name, arr in arrays.items():
            writer.write(name, arr)
    return writer


# --- dtypes -----------------------------------------------------------------


def test_dtype_codes_round_trip():
    for code, dtype in DTYPES.items():
        assert dtype_code(dtype) == code
    assert DTYPES["BF16"] == BF16
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert dtype_code(np.dtype(">f4")) == "F32"  # the writer byte-swaps
    assert dtype_code("bfloat16") == "BF16"


def test_dtype_code_rejects_unsupported():
    with pytest.raises(DemError, match="complex64"):
        dtype_code(np.complex64)
    with pytest.raises(DemError, match="not a numpy dtype"):
        dtype_code("F32")  # a safetensors code, not a numpy dtype


# --- reading files written by the official library -------------------------


def test_reads_numpy_save_file(tmp_path):
    arrays = {
        "f16": np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4),
        "i64": np.arange(-5, 5, dtype=np.int64) * 2**40,
        "bool": np.array([[True, False, True]]),
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((2, 0), dtype=np.int32),
        "u16": np.arange(6, dtype=np.uint16) * 1000,
        "f64": np.array([np.pi, -np.e]),
    }
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"k": "v"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(arrays)
        assert f.metadata == {"k": "v"}
        for name, expected in arrays.items():
            assert name in f
            assert f.shape(name) == expected.shape
            assert f.dtype(name) == expected.dtype
            assert f.nbytes(name) == expected.nbytes
            got = f.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
    assert "missing" not in f


def test_reads_torch_save_file_bfloat16_and_float8(tmp_path):
    tensors = {
        "bf": _bf16_tensor((4, 8)),
        "bf_scalar": torch.tensor(-0.3, dtype=torch.bfloat16),
        "f8": torch.linspace(-3, 3, 10).to(torch.float8_e4m3fn),
        "f8b": torch.linspace(-3, 3, 10).to(torch.float8_e5m2),
        "f32": torch.randn(2, 3),
        "empty_bf": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    path = tmp_path / "pt.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    f = SafetensorsFile(path)
    assert f.metadata == {}
    assert f.dtype("bf") == BF16
    assert f.dtype("f8") == np.dtype(ml_dtypes.float8_e4m3fn)
    for name in ("bf", "bf_scalar", "empty_bf"):
        got = f.read(name)
        assert got.shape == tuple(tensors[name].shape)
        assert _bits_equal(got, tensors[name])
    for name in ("f8", "f8b"):
        got = f.read(name)
        assert np.array_equal(got.view(np.uint8), tensors[name].view(torch.uint8).numpy())
    np.testing.assert_array_equal(f.read("f32"), tensors["f32"].numpy())


def test_keys_in_file_order(tmp_path):
    # safetensors reorders tensors on save, so the header's data offsets, not
    # the dict order we passed, define file order.
    path = tmp_path / "o.safetensors"
    safetensors.numpy.save_file(
        {"b": np.zeros(2, np.int8), "a": np.zeros(3, np.float64), "c": np.zeros(1, np.float32)},
        str(path),
    )
    f = SafetensorsFile(path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert f.keys() == [k for _, k in by_offset]
    assert list(f) == f.keys() and len(f) == 3


# --- reading files we wrote with the official library ------------------------


def test_written_file_loads_with_official_library(tmp_path):
    arrays = _sample_arrays(np.random.default_rng(0))
    writer = _write(tmp_path, arrays, metadata={"format": "pt", "source": "dem"})
    assert writer.files == ["model.safetensors"]
    path = tmp_path / "model.safetensors"

    loaded = safetensors.torch.load_file(str(path))
    assert sorted(loaded) == sorted(arrays)
    for name, expected in arrays.items():
        got = loaded[name]
        assert tuple(got.shape) == expected.shape
        if expected.dtype == BF16:
            assert got.dtype == torch.bfloat16
            assert _bits_equal(expected, got)
        else:
            np.testing.assert_array_equal(got.numpy(), expected)

    with safe_open(str(path), framework="pt") as g:
        assert g.metadata() == {"format": "pt", "source": "dem"}
        assert sorted(g.keys()) == sorted(arrays)
        assert _bits_equal(arrays["bf"], g.get_tensor("bf"))
        # Slices through the official reader see the same bytes too.
        assert _bits_equal(arrays["bf"][1:3], g.get_slice("bf")[1:3])


@pytest.mark.parametrize("pad", range(8))
def test_written_header_layout(tmp_path, pad):
    # Vary the metadata length so every residue mod 8 of the unpadded header occurs.
    arrays = _sample_arrays(np.random.default_rng(1))
    _write(tmp_path, arrays, metadata={"format": "pt", "x": "y" * pad})
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header.pop("__metadata__") == {"format": "pt", "x": "y" * pad}
    # Plan order, contiguous increasing offsets covering the whole data section.
    assert list(header) == list(arrays)
    end = 0
    for name, entry in header.items():
        assert entry["data_offsets"][0] == end
        end = entry["data_offsets"][1]
        assert end - entry["data_offsets"][0] == arrays[name].nbytes
    assert len(raw) == 8 + n + end


def test_metadata_none_omits_metadata(tmp_path):
    _write(tmp_path, {"x": np.ones(2, np.float32)}, metadata=None)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert "__metadata__" not in header
    assert SafetensorsFile(tmp_path / "model.safetensors").metadata == {}


def test_big_endian_and_non_contiguous_input(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {"be": base.astype(">f4"), "strided": base[:, ::2], "fortran": np.asfortranarray(base)}
    specs = [TensorSpec(n, a.shape, a.dtype) for n, a in arrays.items()]
    assert specs[0].dtype == np.dtype("<f4")
    with ShardedSafetensorsWriter(tmp_path, specs) as w:
        for name, arr in arrays.items():
            w.write(name, arr)
    loaded = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(loaded["be"], base)
    np.testing.assert_array_equal(loaded["strided"], base[:, ::2])
    np.testing.assert_array_equal(loaded["fortran"], base)


def test_round_trip_all_dtypes_through_our_reader(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for code, dtype in DTYPES.items():
        if dtype == np.bool_:
            arrays[code] = rng.random((3, 2)) > 0.5
        else:
            arrays[code] = rng.integers(0, 100, size=(3, 2)).astype(dtype)
    _write(tmp_path, arrays)
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        for code, expected in arrays.items():
            got = f.read(code)
            assert got.dtype == DTYPES[code]
            assert np.array_equal(_raw(got), _raw(expected))


# --- slices -------------------------------------------------------------------


INDEXES = [
    (slice(2, 5),),
    (slice(None), slice(1, 3)),
    (slice(1, 2), slice(0, 4), slice(3, 7)),
    (slice(-3, None), slice(None, -1)),
    (slice(5, 100),),  # numpy clips out-of-range bounds
    (slice(3, 3),),  # empty block
    (),
]


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("dtype", [np.float32, BF16, np.int8])
def test_slice_reads_match_numpy(tmp_path, index, dtype):
    full = np.arange(6 * 5 * 8).reshape(6, 5, 8).astype(dtype)
    # A leading int8 tensor leaves the sliced one at an unaligned offset.
    _write(tmp_path, {"pad": np.zeros(3, np.int8), "t": full})
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        got = f.read("t", index)
    expected = full[index]
    assert got.shape == expected.shape
    assert np.array_equal(_raw(got), _raw(expected))
    assert got.flags.c_contiguous


def test_read_returns_owned_copy(tmp_path):
    full = np.arange(20, dtype=np.float32).reshape(4, 5)
    _write(tmp_path, {"t": full})
    f = SafetensorsFile(tmp_path / "model.safetensors")
    for got in (f.read("t"), f.read("t", (slice(1, 3), slice(2, 4)))):
        assert type(got) is np.ndarray
        assert got.flags.owndata and got.flags.writeable and got.flags.c_contiguous
        got[...] = -1  # must not reach the file or later reads
    np.testing.assert_array_equal(f.read("t"), full)
    f.close()
    np.testing.assert_array_equal(f.read("t", (slice(3, 4),)), full[3:4])  # reopens lazily
    f.close()


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ((slice(0, 2, 2),), "step 1"),
        ((slice(None),) * 3, "3 slices"),
        ((1,), "expected a slice"),
        ([slice(0, 1)], "tuple of slices"),
    ],
)
def test_bad_index(tmp_path, index, message):
    _write(tmp_path, {"t": np.zeros((4, 5), np.float32)})
    f = SafetensorsFile(tmp_path / "model.safetensors")
    with pytest.raises(DemError, match=message) as info:
        f.read("t", index)
    assert "'t'" in str(info.value) and "model.safetensors" in str(info.value)


# --- sharding -----------------------------------------------------------------


def test_plan_shards_greedy():
    specs = [
        TensorSpec("a", (10,), np.float32),  # 40 bytes
        TensorSpec("b", (5,), np.float32),  # 20
        TensorSpec("c", (50,), np.float32),  # 200: larger than the limit
        TensorSpec("d", (2,), np.float32),  # 8
        TensorSpec("e", (0,), np.float32),  # 0
        TensorSpec("f", (12,), np.int8),  # 12
    ]
    shards = plan_shards(specs, max_shard_bytes=60)
    assert [[s.name for s in shard] for shard in shards] == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert plan_shards(specs, max_shard_bytes=10**9) == [specs]
    assert plan_shards([], 10) == []
    with pytest.raises(DemError, match="max_shard_bytes"):
        plan_shards(specs, 0)


def test_sharded_write_and_checkpoint_read(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {f"layers.{i}.w": rng.standard_normal((16, 8)).astype(BF16) for i in range(5)}
    arrays["norm"] = rng.standard_normal(8).astype(np.float32)
    arrays["step"] = np.array(7, dtype=np.int64)
    writer = _write(tmp_path, arrays, max_shard_bytes=600)  # each matrix is 256 bytes

    names = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert writer.files == names
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names, "model.safetensors.index.json"]

    index_text = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    total = sum(a.nbytes for a in arrays.values())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(arrays)
    assert index["weight_map"]["layers.0.w"] == names[0]
    assert index["weight_map"]["step"] == names[2]
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"

    for name in names:  # every shard is a standalone valid file for the official reader
        with safe_open(str(tmp_path / name), framework="pt") as g:
            assert g.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == name for k in g.keys())  # noqa: SIM118

    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert [p.name for p in ckpt.files] == names
        assert ckpt.keys() == list(arrays)
        assert len(ckpt) == len(arrays)
        assert ckpt.total_bytes == total
        for name, expected in arrays.items():
            assert name in ckpt
            assert ckpt.shape(name) == expected.shape
            assert ckpt.dtype(name) == expected.dtype
            got = ckpt.read(name)
            assert np.array_equal(_raw(got), _raw(expected))
        np.testing.assert_array_equal(
            ckpt.read("layers.3.w", (slice(2, 5),)).astype(np.float32),
            arrays["layers.3.w"][2:5].astype(np.float32),
        )
        assert "nope" not in ckpt
        with pytest.raises(DemError, match="'nope'"):
            ckpt.read("nope")


def test_single_shard_writes_model_safetensors_without_index(tmp_path):
    arrays = _sample_arrays(np.random.default_rng(4))
    writer = _write(tmp_path, arrays)
    assert writer.files == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert ckpt.files == [tmp_path / "model.safetensors"]
    for name, expected in arrays.items():
        assert np.array_equal(_raw(ckpt.read(name)), _raw(expected))


def test_empty_model_still_writes_a_valid_file(tmp_path):
    with ShardedSafetensorsWriter(tmp_path, []) as w:
        pass
    assert w.files == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as g:
        assert list(g.keys()) == [] and g.metadata() == {"format": "pt"}


def test_rewrite_removes_stale_weight_files(tmp_path):
    arrays = {f"w{i}": np.full(16, i, np.float32) for i in range(4)}
    _write(tmp_path, arrays, max_shard_bytes=64)
    (tmp_path / "config.json").write_text("{}")
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4
    _write(tmp_path, arrays, max_shard_bytes=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    _write(tmp_path, arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_checkpoint_fallback_globs_all_safetensors(tmp_path):
    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "x.safetensors"))
    safetensors.numpy.save_file({"b": np.zeros(3, np.int8)}, str(tmp_path / "y.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert [p.name for p in ckpt.files] == ["x.safetensors", "y.safetensors"]
    assert ckpt.keys() == ["a", "b"]
    np.testing.assert_array_equal(ckpt.read("b"), np.zeros(3, np.int8))


# --- errors ---------------------------------------------------------------------


def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    safetensors.numpy.save_file(
        {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)},
        str(path),
    )
    return path


def _file_with_header(tmp_path: Path, header: object, data: bytes = b"") -> Path:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_error_file_too_short(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(DemError, match=r"tiny\.safetensors: file too short"):
        SafetensorsFile(path)


def test_error_truncated_data(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DemError, match=r"good\.safetensors: tensor '.': data_offsets") as info:
        SafetensorsFile(path)
    assert "truncated" in str(info.value)


def test_error_truncated_header(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DemError, match=r"good\.safetensors: header length .* runs past the end"):
        SafetensorsFile(path)


def test_error_garbage_header(tmp_path):
    path = _file_with_header(tmp_path, b"\xff\xfe not json at all")
    with pytest.raises(DemError, match=r"bad\.safetensors: header is not valid JSON"):
        SafetensorsFile(path)
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a zip (torch .bin) renamed
    with pytest.raises(DemError, match=r"runs past the end .* not safetensors"):
        SafetensorsFile(path)
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(
        DemError, match=r"bad\.safetensors: header length .* not a safetensors file"
    ):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}, "needs 8"),
        ({"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "unsupported dtype 'C64'"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "non-negative"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "outside"),
        ({"dtype": "F32", "shape": [2]}, "lacks data_offsets"),
    ],
)
def test_error_bad_entry(tmp_path, entry, message):
    path = _file_with_header(tmp_path, {"t": entry}, data=b"\x00" * 12)
    with pytest.raises(DemError, match=message) as info:
        SafetensorsFile(path)
    assert "bad.safetensors: tensor 't'" in str(info.value)


def test_error_overlapping_tensors_and_bad_metadata(tmp_path):
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path = _file_with_header(tmp_path, {"a": entry, "b": entry}, data=b"\x00" * 8)
    with pytest.raises(DemError, match="overlap"):
        SafetensorsFile(path)
    path = _file_with_header(tmp_path, {"__metadata__": {"n": 1}})
    with pytest.raises(DemError, match="__metadata__"):
        SafetensorsFile(path)


def test_error_unknown_tensor(tmp_path):
    f = SafetensorsFile(_good_file(tmp_path))
    with pytest.raises(DemError, match=r"good\.safetensors: no tensor named 'nope'"):
        f.read("nope")
    with pytest.raises(DemError, match="'nope'"):
        f.shape("nope")


def _writer(tmp_path: Path) -> ShardedSafetensorsWriter:
    specs = [TensorSpec("a", (2, 3), np.float32), TensorSpec("b", (4,), BF16)]
    return ShardedSafetensorsWriter(tmp_path / "out", specs)


def test_error_out_of_order_write(tmp_path):
    w = _writer(tmp_path)
    with pytest.raises(DemError, match="tensor 'b' written out of order; expected 'a'"):
        w.write("b", np.zeros(4, BF16))
    with pytest.raises(DemError, match="tensor 'zzz' is not in the write plan"):
        w.write("zzz", np.zeros(4, BF16))
    w.abort()


def test_error_wrong_shape_and_dtype(tmp_path):
    w = _writer(tmp_path)
    with pytest.raises(DemError, match=r"tensor 'a' has shape \(3, 2\), planned \(2, 3\)"):
        w.write("a", np.zeros((3, 2), np.float32))
    with pytest.raises(DemError, match="tensor 'a' has dtype float64, planned float32"):
        w.write("a", np.zeros((2, 3)))  # no silent cast
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(DemError, match="tensor 'b' has dtype float32, planned bfloat16"):
        w.write("b", np.zeros(4, np.float32))
    w.write("b", np.zeros(4, BF16))
    w.close()
    with pytest.raises(DemError, match="writer is closed"):
        w.write("a", np.zeros((2, 3), np.float32))


def test_error_missing_tensor_at_close_leaves_nothing(tmp_path):
    w = _writer(tmp_path)
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(DemError, match=r"closed before writing 1 planned tensor\(s\): 'b'"):
        w.close()
    assert list((tmp_path / "out").iterdir()) == []


def test_context_manager_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), _writer(tmp_path) as w:
        w.write("a", np.zeros((2, 3), np.float32))
        raise RuntimeError("boom")  # the original error, not a missing-tensor one
    assert list((tmp_path / "out").iterdir()) == []


def test_error_bad_specs(tmp_path):
    with pytest.raises(DemError, match="'x' appears twice"):
        ShardedSafetensorsWriter(
            tmp_path, [TensorSpec("x", (1,), np.float32), TensorSpec("x", (1,), np.float32)]
        )
    with pytest.raises(DemError, match="tensor 'c': dtype complex128"):
        TensorSpec("c", (1,), np.complex128)
    with pytest.raises(DemError, match="'__metadata__'"):
        TensorSpec("__metadata__", (1,), np.float32)


def test_error_index_points_to_missing_file(tmp_path):
    arrays = {f"w{i}": np.full(16, i, np.float32) for i in range(3)}
    _write(tmp_path, arrays, max_shard_bytes=64)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(DemError, match=r"missing file 'model-00002-of-00003\.safetensors'") as info:
        SafetensorsCheckpoint(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)


def test_error_index_disagrees_with_shard(tmp_path):
    arrays = {f"w{i}": np.full(16, i, np.float32) for i in range(3)}
    _write(tmp_path, arrays, max_shard_bytes=64)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["w0"] = "model-00002-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(DemError, match="tensor 'w0' is in model-00002-of-00003"):
        SafetensorsCheckpoint(tmp_path)
    index_path.write_text("{not json")
    with pytest.raises(DemError, match=r"index\.json: not valid JSON"):
        SafetensorsCheckpoint(tmp_path)


def test_error_empty_directory(tmp_path):
    with pytest.raises(
        DemError, match=r"no safetensors weights.*convert them to safetensors"
    ) as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(tmp_path) in str(info.value) and ".bin" in str(info.value)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(DemError, match=r"found pytorch_model\.bin"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(DemError, match="not a directory"):
        SafetensorsCheckpoint(tmp_path / "nowhere")


def test_error_same_tensor_in_two_files(tmp_path):
    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "x.safetensors"))
    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(DemError, match=r"tensor 'a' is in both x\.safetensors and y\.safetensors"):
        SafetensorsCheckpoint(tmp_path)
