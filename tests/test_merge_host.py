"""The host merge executor (NumPy, no JAX) against the JAX engine on the same MERGE.yaml,
its selection and bfloat16 arithmetic against NumPy's and ml_dtypes', and when it runs.

mergekit parity of these methods is in test_mergekit_parity*.py, which now run on the
host executor (``--engine auto``); here every host method and setting is also run on
the JAX engine (``--engine jax``) and the two outputs compared tensor by tensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from test_merge import make_family

from dem_jax import cli
from dem_jax.errors import DemError
from dem_jax.merge import host_kernels as hk
from dem_jax.merge import host_masks as masks
from dem_jax.merge import host_methods
from dem_jax.merge.from_config import merge_from_config


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("hfamily"), n=3)


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """Deltas on a grid of 0.01 steps: many equal magnitudes at every top-k threshold,
    so the tie rule (lower index first) decides which are kept."""
    import torch

    paths = make_family(tmp_path_factory.mktemp("hties"), n=2, case="llama_tied")
    base = load(paths[0])
    for p in paths[1:]:
        tensors = {k: base[k] + np.round((v - base[k]) * 100) / 100 for k, v in load(p).items()}
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, p / "model.safetensors")
    return paths


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    import torch

    return make_family(tmp_path_factory.mktemp("hbf16"), n=2, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("hmoe"), n=2, case="mixtral")


def load(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in out.items()}


def config(paths, method, models=None, **extra):
    models = models if models is not None else [{"model": str(p)} for p in paths[1:]]
    return {"merge_method": method, "base_model": str(paths[0]), "models": models, **extra}


def both_engines(tmp_path, cfg) -> tuple[Path, Path]:
    """The same MERGE.yaml merged by each engine: (host output, JAX output)."""
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    outs = []
    for engine in ("host", "jax"):
        outs.append(merge_from_config(path, tmp_path / engine, engine=engine))
    return outs[0], outs[1]


def assert_same_merge(ours: Path, ref: Path, base: Path | None = None, rtol=2e-6, atol=1e-7):
    """Same files, config and tensors (to float32 rounding of whole-tensor sums), and
    the same entries left at the base's value (so the same top-k selections)."""
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert json.loads((ours / "config.json").read_text()) == json.loads(
        (ref / "config.json").read_text()
    )
    a, b = load(ours), load(ref)
    assert list(a) == list(b)  # same tensors in the same (export) order
    start = load(base) if base is not None else {}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)
        if name in start:
            unmoved = a[name] == start[name]
            np.testing.assert_array_equal(unmoved, b[name] == start[name], err_msg=name)


GRID = [
    ("task_arithmetic", {"weight": 0.7}, {"lambda": 0.8}),
    ("dem", {"weight": [0.2, 0.9]}, {}),  # a gradient over the layers
    ("ties", {"weight": 0.5, "density": 0.5}, {}),
    ("ties", {"weight": 1.0, "density": [0.2, 0.7]}, {"rescale": True, "normalize": False}),
    ("ties", {"weight": 1.0, "density": 0.3}, {"int8_mask": True, "lambda": 1.3}),
    ("breadcrumbs", {"weight": 0.5, "density": 0.6, "gamma": 0.1}, {}),
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"rescale": True}),
    ("linear", {"weight": 1.0}, {"normalize": False}),
    ("linear", {"weight": [1.0, 0.1]}, {}),
    ("model_stock", {}, {}),
    ("model_stock", {}, {"filter_wise": True}),
]


@pytest.mark.parametrize(
    "method, per_model, shared", GRID, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(GRID)]
)
def test_host_equals_the_jax_engine(family, tmp_path, method, per_model, shared):
    models = [{"model": str(p), "parameters": dict(per_model)} for p in family[1:]]
    # a filtered setting for one model: only its MLP tensors take other values
    if "weight" in per_model:
        models[0]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    if method == "linear":  # the base is averaged too, with its own weight
        models.append({"model": str(family[0]), "parameters": dict(per_model)})
    cfg = config(family, method, models, parameters=shared, dtype="float32")
    assert_same_merge(*both_engines(tmp_path, cfg), base=family[0])


def test_slerp_with_a_gradient(family, tmp_path):
    cfg = config(family, "slerp", [{"model": str(family[1])}], parameters={"t": [0.0, 0.3, 1.0]})
    assert_same_merge(*both_engines(tmp_path, cfg))


def test_ties_breaks_ties_as_the_jax_engine(tied_family, tmp_path):
    base, ft = load(tied_family[0]), load(tied_family[1])
    delta = ft["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]
    _values, counts = np.unique(np.abs(delta), return_counts=True)
    assert counts.max() > 20  # the fixture does make ties
    models = [
        {"model": str(p), "parameters": {"weight": 1.0, "density": 0.35}} for p in tied_family[1:]
    ]
    host_out, jax_out = both_engines(tmp_path, config(tied_family, "ties", models))
    a, b = load(host_out), load(jax_out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [("bfloat16", None), ("float16", "float32"), (None, "bfloat16"), (None, "float16")],
)
def test_precision_settings(family, tmp_path, dtype, out_dtype):
    """Inputs rounded to ``dtype`` before merging, the result written in ``out_dtype``."""
    extra = {k: v for k, v in {"dtype": dtype, "out_dtype": out_dtype}.items() if v}
    models = [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.6}} for p in family[1:]]
    host_out, jax_out = both_engines(tmp_path, config(family, "ties", models, **extra))
    wide = (out_dtype or dtype or "float32") != "float32"
    assert_same_merge(host_out, jax_out, rtol=8e-3 if wide else 2e-6, atol=1e-3 if wide else 1e-7)
    stored = {v.dtype for v in load_file(next(host_out.glob("*.safetensors"))).values()}
    numpy_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
    assert stored == {np.dtype(numpy_dtype[out_dtype or dtype])}


def test_bfloat16_checkpoints(bf16_family, tmp_path):
    models = [{"model": str(p), "parameters": {"weight": 0.6}} for p in bf16_family[1:]]
    host_out, jax_out = both_engines(tmp_path, config(bf16_family, "task_arithmetic", models))
    for name, v in load_file(host_out / "model.safetensors").items():
        assert v.dtype == ml_dtypes.bfloat16, name
    # bfloat16 outputs: equal, or one bfloat16 step apart where float32 rounding differs
    assert_same_merge(host_out, jax_out, rtol=8e-3, atol=1e-6)


def test_mixture_of_experts_expert_by_expert(moe_family, tmp_path):
    models = [
        {"model": str(p), "parameters": {"weight": 0.5, "density": 0.4}} for p in moe_family[1:]
    ]
    assert_same_merge(*both_engines(tmp_path, config(moe_family, "ties", models)), moe_family[0])


@pytest.mark.parametrize("which", ["family", "bf16_family"])
def test_host_merge_does_not_import_jax(request, tmp_path, which):
    """Nor ml_dtypes, whose import alone costs 0.6 s: bfloat16 is handled as bits."""
    family = request.getfixturevalue(which)
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump(
            config(
                family,
                "ties",
                [
                    {"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}}
                    for p in family[1:]
                ],
            )
        )
    )
    code = (
        "import sys; from dem_jax import cli; "
        f"rc = cli.main(['merge', {str(path)!r}, '--out', {str(tmp_path / 'o')!r}, '--quiet']); "
        "heavy = ('jax', 'flax', 'orbax', 'torch', 'transformers', 'ml_dtypes'); "
        "heavy = sorted(m for m in heavy if m in sys.modules); "
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_seeded_per_engine(family, tmp_path, method):
    """Each engine is reproducible for a seed and changes with it; the two draw other
    numbers (SFC64 here, threefry there) from the same distribution: the same share
    of each delta is kept (density 0.4) and, with rescale, its L1 norm is kept."""
    models = [
        {"model": str(family[1]), "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.1}}
    ]
    if not method.startswith("della"):
        del models[0]["parameters"]["epsilon"]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(config(family, method, models)))
    runs = {}
    for name, engine, seed in [
        ("a", "host", 1),
        ("b", "host", 1),
        ("c", "host", 2),
        ("j", "jax", 1),
    ]:
        runs[name] = load(merge_from_config(path, tmp_path / name, engine=engine, seed=seed))
    base, ft = load(family[0]), load(family[1])
    name = "model.layers.1.mlp.down_proj.weight"
    for k in runs["a"]:
        np.testing.assert_array_equal(runs["a"][k], runs["b"][k])
    assert not np.array_equal(runs["a"][name], runs["c"][name])
    delta = ft[name] - base[name]
    kept = {}
    for key in ("a", "j"):
        moved = runs[key][name] - base[name]
        kept[key] = np.mean(np.abs(moved) > 1e-9)
        # rescale (the default of every random method but dare_linear): the L1 norm kept
        if method != "dare_linear":
            np.testing.assert_allclose(np.abs(moved).sum(), np.abs(delta).sum(), rtol=1e-4)
    assert abs(kept["a"] - 0.4) < 0.05 and abs(kept["j"] - 0.4) < 0.05, kept


@pytest.mark.parametrize(
    "method, flags, needle",
    [
        ("parameter_selection", [], "merge_method parameter_selection runs on the JAX engine"),
        ("ties", ["--format", "orbax"], "--format hf"),
        ("ties", ["--mesh", "fsdp=1"], "without a device mesh"),
    ],
)
def test_engine_host_says_why_not(family, tmp_path, capsys, method, flags, needle):
    params = {} if method == "parameter_selection" else {"weight": 0.5, "density": 0.5}
    models = [{"model": str(p), "parameters": params} for p in family[1:3]]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(config(family, method, models)))
    code = cli.main(["merge", str(path), "--out", str(tmp_path / "o"), "--engine", "host", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o").exists()


def test_a_failed_merge_leaves_nothing(family, tmp_path, monkeypatch):
    calls = []

    def failing(base, xs, v, flags, rng):
        calls.append(1)
        if len(calls) == 7:
            raise DemError("disk on fire")
        return xs[0]

    monkeypatch.setitem(host_methods.KERNELS, "ties", failing)
    models = [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in family[1:]]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(config(family, "ties", models)))
    with pytest.raises(DemError, match="disk on fire"):
        merge_from_config(path, tmp_path / "o", engine="host")
    assert len(calls) >= 7  # (and the threads' tensors in flight)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".o.tmp", "o"))]


# ------------------------------------------------------------------ the kernels' parts


@pytest.mark.parametrize("case", ["random", "ties", "misleading sample", "small"])
def test_kth_largest_is_exact(case):
    rng = np.random.default_rng(0)
    n = 50_000 if case != "small" else 500
    mag = np.abs(rng.standard_normal(n)).astype(np.float32)
    if case == "ties":
        mag = np.round(mag * 4) / 4
    if case == "misleading sample":  # every 16th element (the sample) far larger
        mag[::16] += 100
    keys = mag.view(np.int32)
    for k in (1, 7, n // 16, n // 2, n - 1, n):
        v, above, at = hk.kth_largest_counts(keys, k)
        assert v == np.sort(keys)[n - k] == hk.kth_largest(keys, k), k
        assert (above, at) == (np.count_nonzero(keys > v), np.count_nonzero(keys == v)), k


@pytest.mark.parametrize("k", [0, 1, 333, 999, 1000])
def test_top_k_mask_takes_ties_by_index(k):
    mag = np.repeat(np.arange(10, dtype=np.float32), 100)[::-1].copy()  # 100 of each
    mask = hk.top_k_mask(mag, k)
    order = np.argsort(-mag, kind="stable")  # descending, ties by index
    expected = np.zeros(mag.shape, bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(mask, expected)


def test_bfloat16_conversions_match_ml_dtypes():
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ref = every.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(hk.bf16_to_f32(every).view(np.uint32), ref.view(np.uint32))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, 1e-45], np.float32
    )
    x = np.concatenate([x, special])
    ours = hk.f32_to_bf16(x)
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on NaN inputs
        theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(hk.bf16_to_f32(ours[nan])).all()


@pytest.mark.parametrize("case", ["random", "ties", "zeros"])
@pytest.mark.parametrize("density, gamma", [(0.6, 0.1), (0.9, 0.2), (0.5, 0.0), (0.3, 0.7)])
def test_breadcrumbs_key_range_equals_its_masks(case, density, gamma):
    """The (lo, hi] key range breadcrumbs uses keeps exactly the entries of ascending
    rank n_bot .. n - n_top - 1 (two selection masks), ties by index."""
    rng = np.random.default_rng(0)
    d = rng.standard_normal((64, 33)).astype(np.float32)
    if case == "ties":
        d = np.round(d * 3) / 3
    if case == "zeros":
        d[:, ::2] = 0
    n = d.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(d).reshape(-1), kind="stable")  # ascending, ties by index
    expected = np.zeros(n, bool)
    expected[order[n_bot : n - n_top]] = True
    keep = hk.breadcrumbs_keep(d, density, gamma)
    got = keep if isinstance(keep, np.ndarray) else hk._kept(d, keep, slice(None))
    np.testing.assert_array_equal(got.reshape(-1), expected)


def _della_reference(d, density, epsilon, u):
    """DELLA's keep by its definition: p = density - epsilon + 2 epsilon r / (m - 1), r
    the stable rank of |d| in its row, kept where u < p (float64); zeros dropped."""
    m = d.shape[-1]
    mag = np.abs(d.astype(np.float64)).reshape(-1, m)
    rank = np.empty(mag.shape)
    np.put_along_axis(rank, np.argsort(mag, axis=-1, kind="stable"), np.arange(m)[None], -1)
    p = density - epsilon + 2 * epsilon * rank / (m - 1)
    return ((u.reshape(-1, m) < p) & (mag != 0)).reshape(d.shape)


@pytest.mark.parametrize("case", ["continuous", "ties", "zeros", "bfloat16"])
def test_della_keep_is_its_definition(case):
    # della_keep ranks by comparing |d| with its row sorted at a random position (no
    # argsort), ranking exactly only rows where a repeated magnitude sits there; zeros
    # are dropped (they add nothing either way).
    rng = np.random.default_rng(3)
    d = (0.01 * rng.standard_normal((96, 160))).astype(np.float32)
    if case == "ties":
        d = np.round(d * 400).astype(np.float32) / 400  # ~20 values a row repeat often
    elif case == "zeros":
        d[rng.random(d.shape) < 0.3] = 0
    elif case == "bfloat16":
        d = hk.bf16_to_f32(hk.f32_to_bf16(d))
    u = hk.uniform_from_bits(hk.random_bits(np.random.SFC64(5), d.shape))
    for density, epsilon in [(0.5, 0.1), (0.3, 0.3), (0.9, 0.05), (0.5, 0.0)]:
        ours, ref = hk.della_keep(d, density, epsilon, u), _della_reference(d, density, epsilon, u)
        # u near a probability step may round across it in float32 (v's formula): a
        # handful of entries at most, never a systematic difference
        assert np.sum(ours != ref) <= 2, (case, density, epsilon, np.sum(ours != ref))


def test_della_keep_rates_follow_the_rank():
    # Over many rows, the smallest |d| of each row is kept at density - epsilon, the
    # largest at density + epsilon, the median in between.
    rng = np.random.default_rng(0)
    d = rng.standard_normal((20000, 65)).astype(np.float32)
    u = hk.uniform_from_bits(hk.random_bits(np.random.SFC64(1), d.shape))
    keep = hk.della_keep(d, 0.5, 0.2, u)
    order = np.argsort(np.abs(d), axis=-1)
    rows = np.arange(d.shape[0])
    for pos, want in [(0, 0.3), (32, 0.5), (64, 0.7)]:
        rate = keep[rows, order[:, pos]].mean()
        assert abs(rate - want) < 0.015, (pos, rate, want)


def test_random_bits_and_dare_keep_rates():
    bits = hk.random_bits(np.random.SFC64(0), (1001, 999))
    assert bits.dtype == np.uint32 and bits.shape == (1001, 999)
    u = hk.uniform_from_bits(bits)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert np.all(u * 2**24 == np.floor(u * 2**24))  # multiples of 2^-24
    assert abs(u.mean() - 0.5) < 1e-3 and abs(u.var() - 1 / 12) < 1e-3
    d = np.ones(bits.shape, np.float32)
    for density in (0.0, 0.1, 0.5, 0.97):
        rate = hk.random_keep(d, density, bits).mean()
        assert abs(rate - density) < 2e-3, (density, rate)
    assert hk.random_keep(d, 1.0, bits) is None


# The interpolation methods and SCE on the host: (method, models' parameters, global
# parameters, whether the base is given).
MORE = [
    ("nuslerp", [{"weight": 0.3}, {"weight": [0.6, 0.2]}], {}, True),
    ("nuslerp", [{"weight": 0.3}, {"weight": 0.6}], {"nuslerp_flatten": False}, False),
    (
        "nuslerp",
        [{"weight": 0.5}, {"weight": 0.4}],
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        True,
    ),
    ("multislerp", [{"weight": 0.3}, {"weight": 0.6}, {"weight": 0.2}], {}, True),
    ("multislerp", [{"weight": 1.0}, {"weight": 2.0}], {"normalize_weights": False}, False),
    ("nearswap", [{}], {"t": [0.001, 0.02]}, True),
    ("sce", [{}, {}, {}], {"select_topk": [{"filter": "mlp", "value": 1.0}, {"value": 0.4}]}, True),
    # the base averaged as one more input; max_iter 1, 5 and 9 over the layers
    ("karcher", [{}, {}], {"max_iter": [1, 9], "tol": 1e-4}, True),
    ("ram", [{}, {}, {}], {"epsilon": 0.003}, True),
    ("ramplus_tl", [{}, {}, {}], {"epsilon": 0.003, "r": 0.5, "alpha": [0.1, 0.6]}, True),
]


@pytest.mark.parametrize(
    "method, settings, shared, with_base", MORE, ids=[f"{m[0]}-{i}" for i, m in enumerate(MORE)]
)
def test_more_methods_equal_the_jax_engine(family, tmp_path, method, settings, shared, with_base):
    models = [
        {"model": str(p), "parameters": s} if s else {"model": str(p)}
        for p, s in zip(family[1:], settings, strict=False)
    ]
    cfg = {"merge_method": method, "models": models, "parameters": shared, "dtype": "float32"}
    if with_base:
        cfg["base_model"] = str(family[0])
    host_out, jax_out = both_engines(tmp_path, cfg)
    # the same selections (entries left at the base) for the methods that keep entries
    selects = method in ("sce", "ram", "ramplus_tl")
    assert_same_merge(host_out, jax_out, base=family[0] if selects else None, rtol=1e-5)


def test_arcee_fusion_is_its_definition():
    # The importance's KL is a sum of p log(p / q) with p ~ q: float32 gets it to about
    # 1 % (XLA, torch and NumPy each differ), so entries whose float64 importance lies
    # within 5 % of the threshold may go either way; every other entry must be decided
    # as the float64 definition decides it, with the model's value or the base's.
    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 48)).astype(np.float32)
    model = base + (0.05 * rng.standard_normal(base.shape)).astype(np.float32)
    out = masks.arcee_fusion(base, model.copy())
    b, m = base.astype(np.float64), model.astype(np.float64)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(m) + 1e-8, softmax(b) + 1e-8
    importance = np.abs(m - b) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.sort(importance.reshape(-1))
    q1, med, q3 = (s[int(np.float32(x) * np.float32(s.size - 1))] for x in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    clear = np.abs(importance - threshold) > 0.05 * threshold
    moved = base + (model - base)  # the model's value, as float32 computes it
    want = np.where(importance >= threshold, moved, base)
    np.testing.assert_array_equal(out[clear], want[clear])
    assert np.all((out == moved) | (out == base))
    assert 0 < np.sum(out != base) < base.size / 4 and clear.mean() > 0.95


@pytest.mark.parametrize("rescale", [False, True])
def test_a_tie_cut_keeps_what_its_mask_keeps_across_chunks(rescale):
    # Magnitudes on a coarse grid: the k-th value repeats, so TIES's keep is a Cut
    # (>= v up to one flat index) applied chunk by chunk; it must keep exactly the
    # top-k mask (ties lower index first) wherever the cut falls in a chunk.
    rng = np.random.default_rng(7)
    shape = (5, 3 * hk._CHUNK // 5 + 17)  # several chunks, ragged last
    base = rng.standard_normal(shape).astype(np.float32)
    deltas = [np.round(rng.standard_normal(shape) * 4).astype(np.float32) / 64 for _ in range(3)]
    for density in (0.13, 0.5, 0.77):
        cuts = [hk.magnitude_keep(d, density) for d in deltas]
        assert all(isinstance(c, hk.Cut) for c in cuts)
        k = int(density * base.size)
        masks = []  # by a stable sort: the k largest, equal magnitudes lower index first
        for d in deltas:
            mask = np.zeros(d.size, bool)
            mask[np.argsort(-np.abs(d).reshape(-1), kind="stable")[:k]] = True
            masks.append(mask.reshape(shape))
        for d, c, m in zip(deltas, cuts, masks, strict=True):
            np.testing.assert_array_equal(hk._kept(d, c, slice(None)), m)
        w = np.array([0.5, 0.3, 0.9])
        runs = [
            hk.task_arithmetic(
                base,
                [d.copy() for d in deltas],
                w,
                keeps=keeps,
                rescale=rescale,
                consensus=True,
                normalize=True,
                lam=1.0,
            )
            for keeps in (cuts, masks)
        ]
        np.testing.assert_array_equal(runs[0], runs[1])


def test_a_breadcrumbs_band_keeps_its_stable_ranks_across_chunks():
    # Repeated magnitudes at both ends of breadcrumbs' kept ranks: a Band (ties at the
    # bottom value dropped, at the top value kept, lower index first) applied chunk by
    # chunk must keep exactly the stable ascending ranks n_bot .. n - n_top - 1.
    rng = np.random.default_rng(11)
    shape = (4, 3 * hk._CHUNK // 4 + 9)
    d = np.round(rng.standard_normal(shape) * 6).astype(np.float32) / 64
    n = d.size
    rank = np.empty(n, np.int64)
    rank[np.argsort(np.abs(d).reshape(-1), kind="stable")] = np.arange(n)
    for density, gamma in [(0.5, 0.1), (0.2, 0.3), (0.9, 0.0), (0.3, 0.7), (0.0, 0.0)]:
        keep = hk.breadcrumbs_keep(d, density, gamma)
        target, n_top = int(density * n), int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        want = ((rank >= n_bot) & (rank < n - n_top)).reshape(shape)
        got = np.ones(shape, bool) if keep is None else hk._kept(d, keep, slice(None))
        np.testing.assert_array_equal(got, want, err_msg=f"{density} {gamma} {keep}")
        if density in (0.5, 0.2):
            assert isinstance(keep, hk.Band)
        base = rng.standard_normal(shape).astype(np.float32)
        runs = [
            hk.task_arithmetic(
                base,
                [d.copy()],
                np.array([0.7]),
                keeps=[k],
                rescale=True,
                consensus=True,
                normalize=False,
                lam=1.0,
            )
            for k in (keep, want)
        ]
        np.testing.assert_array_equal(runs[0], runs[1])
