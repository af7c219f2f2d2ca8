"""End to end on each dense family beyond Llama: Qwen3, Gemma 2, Gemma 3 (text), Phi-3
and OLMo 2, each on its tiny random transformers model (``FAMILY_CASES`` in hf_models).

Per family:

* conversion: HF -> dem-jax -> HF through ``dem-jax convert`` is bit-exact in float32
  and bfloat16, and config.json comes back (plus the 4.x rope keys) as transformers'
  same config and model; a 4.x-spelled config.json reads as the same model and is
  written back unchanged; a model without a source config.json exports one of its
  family that transformers loads;
* logits: padded (left, right) and packed batches equal transformers'; on weights
  scaled so that each switch matters, each family switch set back to Llama's moves
  the logits far past that tolerance (so the parity is not vacuous);
* decoding: KV-cache greedy decoding equals ``generate``, token and logits per step;
* the method, through the CLI from the HF base: one training step (loss, gradient norm
  and the sign of every weight's step equal transformers'), ``vectors`` (ft - base),
  a task-arithmetic ``merge --format hf`` (base + λ·Δ, reloaded by transformers),
  ``score`` (transformers' NLL of the export) and a grid ``search`` (each candidate's
  score is transformers' NLL of base + ω·Δ);
* TIES equals mergekit 0.1.5, whose architecture files cover all five families.

And a config.json of an unsupported architecture is refused with one line.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
import yaml
from hf_models import (
    FAMILY_CASES,
    FUSED_EXPERTS,
    VOCAB,
    build_hf_model,
    per_expert_tensors,
    random_tokens,
    save_hf_model,
    torch_logits,
)
from safetensors.numpy import load_file, save_file
from test_hf_roundtrip import raw_tensors
from test_merge import make_family
from test_mergekit_parity import run_both
from test_score import torch_reference

import dem_jax
from dem_jax import cli
from dem_jax.config.model import RopeScaling
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.io.hf.weights import iter_hf_tensors
from dem_jax.io.modeldir import Model
from dem_jax.io.run_layout import RunLayout
from dem_jax.merge.from_config import merge_from_config
from dem_jax.merge.method import REQUIRED
from dem_jax.merge.registry import METHODS
from dem_jax.model.generate import greedy_generate, left_pad
from dem_jax.model.transformer import bind, init_cache, param_shapes
from dem_jax.vectors.store import load_vector

FAMILIES = list(FAMILY_CASES)
# The mixtures of experts run the end-to-end tests too (their own file, test_moe.py,
# covers the round trip, decoding and mergekit).
MOE_CASES = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}
WITH_MOE = FAMILIES + list(MOE_CASES)
TOL = 1e-4  # logits against transformers, as in test_model_parity


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """family -> (HF directory, float32 transformers model, dem-jax model), built once."""
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(family):
        if family not in cache:
            path = root / family
            hf = save_hf_model({**FAMILY_CASES, **MOE_CASES}[family], path)
            cache[family] = (path, hf, dem_jax.load_model(path))
        return cache[family]

    return get


def main(capsys, *argv) -> str:
    """Run the CLI in process; its stdout (exit status 0 asserted, stderr shown if not)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


# --- HF -> dem-jax -> HF ------------------------------------------------------------

# What the export adds to each source config.json: the transformers 4.x spelling of the
# rope (transformers 5 wrote only `rope_parameters`), written out here by hand.
ROPE_4X = {
    "qwen3": {"rope_theta": 10000.0, "rope_scaling": None},
    "gemma2": {"rope_theta": 10000.0, "rope_scaling": None},
    "gemma3": {
        "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "rope_local_base_freq": 1e4,
    },
    "phi3": {"rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 0.6},
    "olmo2": {"rope_theta": 10000.0, "rope_scaling": None},
}
TOKENIZER_IDS = {"bos_token_id": 1, "eos_token_id": 2}  # <s>, </s> of save_tokenizer


def transformers_config(path) -> dict:
    """The config transformers builds from ``path``, as a dict without its origin."""
    config = transformers.AutoConfig.from_pretrained(path).to_dict()
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    return config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, dtype, tmp_path, capsys):
    src, mid, back = tmp_path / "src", tmp_path / "orbax", tmp_path / "back"
    hf = save_hf_model(FAMILY_CASES[family], src, dtype=dtype)
    main(capsys, "convert", "hf-to-orbax", src, mid)
    main(capsys, "convert", "orbax-to-hf", mid, back)

    tensors = raw_tensors(src)
    assert raw_tensors(back) == tensors
    assert {t[0] for t in tensors.values()} == {dtype}
    assert dem_jax.load_model(mid).config.param_dtype == str(dtype).removeprefix("torch.")

    src_json = json.loads((src / "config.json").read_text())
    filled = {k: v for k, v in TOKENIZER_IDS.items() if src_json.get(k) is None}
    assert json.loads((back / "config.json").read_text()) == {
        **src_json,
        **ROPE_4X[family],
        **filled,
    }
    # transformers reads the same config (Phi-3 keeps the top-level copy of its
    # partial_rotary_factor as an attribute; rope_parameters say the same) ...
    extra = {"partial_rotary_factor": 0.6} if family == "phi3" else {}
    assert transformers_config(back) == {**transformers_config(src), **filled, **extra}
    # ... and builds the same model from it (both loaded alike: the in-memory bfloat16
    # model also cast its rope buffers).
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    assert type(reloaded) is type(hf) and reloaded.dtype == dtype
    tokens = random_tokens(2, 9)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(original, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4x_config_reads_and_is_kept(family, base, tmp_path):
    """Most published checkpoints spell the rope the 4.x way (top-level rope_theta,
    rope_scaling, Gemma 3's rope_local_base_freq, Phi's partial_rotary_factor) and
    older Gemma configs have no layer_types (Gemma 2 alternates from a sliding first
    layer, Gemma 3 follows sliding_window_pattern): the same model, and an export
    writes the file back as it was."""
    src, hf, model = base(family)
    config = json.loads((src / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    old.update(ROPE_4X[family], torch_dtype=config["dtype"])
    if family.startswith("gemma"):
        assert old.pop("layer_types")[:2] == ["sliding_attention", "full_attention"]
    if family == "gemma3":
        old["sliding_window_pattern"] = 2  # every 2nd layer global: the case's layer_types
    shutil.copytree(src, tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))

    loaded = dem_jax.load_model(tmp_path / "old")
    assert loaded.config == model.config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    tokens = random_tokens(2, 9)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(hf, tokens))
    dem_jax.save_model(loaded, tmp_path / "back", format="hf")
    filled = {k: v for k, v in TOKENIZER_IDS.items() if old.get(k) is None}
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == {**old, **filled}


@pytest.mark.parametrize("family", WITH_MOE)
def test_fresh_export_loads_in_transformers(family, base, tmp_path):
    """A model dem-jax made itself (no source config.json) exports a config.json of its
    family that transformers loads as the same model."""
    _, hf, model = base(family)
    dem_jax.save_model(Model(model.config, model.params), tmp_path / "hf", format="hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == hf.config.model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is type(hf)
    tokens = random_tokens(2, 9)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(hf, tokens))
    assert dem_jax.load_model(tmp_path / "hf").config == model.config


# --- logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", WITH_MOE)
def test_padded_and_packed_batches_match_transformers(family, base):
    _, hf, model = base(family)
    tokens = random_tokens(3, 13, seed=1)
    lengths = np.array([13, 8, 4])
    idx = np.arange(13)
    for side in ("left", "right"):
        if side == "right":
            mask = (idx[None] < lengths[:, None]).astype(np.int64)
        else:
            mask = (idx[None] >= 13 - lengths[:, None]).astype(np.int64)
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        ours = np.asarray(dem_jax.forward(model, tokens, attention_mask=mask, positions=positions))
        ref = torch_logits(hf, tokens, attention_mask=mask, position_ids=positions)
        valid = mask.astype(bool)
        np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0, err_msg=side)
        for row in range(len(lengths)):  # each row as if it ran alone, unpadded
            alone = torch_logits(hf, tokens[row][valid[row]][None])[0]
            np.testing.assert_allclose(ours[row][valid[row]], alone, atol=TOL, rtol=0)

    # Two documents in one row, longer than the families' windows (4, 5): each must
    # equal that document run alone in transformers (positions restart per segment).
    a, b = random_tokens(1, 7, seed=2), random_tokens(1, 6, seed=3)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 7 + [2] * 6])
    out = np.asarray(dem_jax.forward(model, packed, segment_ids=segments))
    np.testing.assert_allclose(out[:, :7], torch_logits(hf, a), atol=TOL, rtol=0)
    np.testing.assert_allclose(out[:, 7:], torch_logits(hf, b), atol=TOL, rtol=0)


# Each family's switches, each set back to Llama's value on its own: the logits must
# then leave transformers' far beyond TOL, or the parity would not notice the switch
# missing. (A switch that changes the parameters drops the ones it removes.)
SWITCHES = {
    "qwen3": {"qk_norm": None},
    "gemma2": {
        "attn_softcap": None,
        "final_softcap": None,
        "query_pre_attn_scalar": None,
        "embed_scale": False,
        "norm_kind": "llama",
        "hidden_act": "silu",
        "sliding_windows": None,
    },
    "gemma3": {
        "qk_norm": None,
        "local_rope_theta": None,
        "rope_scaling": RopeScaling(),
        "sliding_windows": None,
    },
    "phi3": {"partial_rotary_factor": 1.0, "sliding_windows": None},
    "olmo2": {"qk_norm": None},
}
SHARPEN = 4.0  # q and k (or their norms) and the embedding scaled by this


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """family -> (transformers model, dem-jax model) whose attention scores and logits are
    ~16x and 4x the random init's. At init the scores are so small that soft-capping the
    scores at 2 changes the tiny Gemma 2's logits by 7e-7 (< TOL) and Phi-3's partial
    rotary by 3e-3: at this scale every switch moves them by more than 2e-2."""
    root = tmp_path_factory.mktemp("sharp")
    cache = {}

    def get(family):
        if family not in cache:
            hf = build_hf_model(FAMILY_CASES[family])
            gemma = family.startswith("gemma")  # its norms scale by 1 + w
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    if re.search(r"\.(q|k|qkv)_proj\.", name):
                        p.mul_(SHARPEN)
                    elif re.search(r"\.(q|k)_norm\.", name):
                        p.copy_((1 + p) * SHARPEN - 1 if gemma else p * SHARPEN)
                    elif "embed_tokens" in name:
                        p.mul_(SHARPEN)
            hf.save_pretrained(root / family)
            cache[family] = (hf, dem_jax.load_model(root / family))
        return cache[family]

    return get


def without(model: Model, **changes) -> Model:
    """``model`` with config fields changed, keeping only the parameters still used."""
    config = model.config.replace(**changes)

    def keep(params, shapes):
        return {
            k: keep(v, shapes[k]) if isinstance(v, dict) else v
            for k, v in params.items()
            if k in shapes
        }

    return Model(config, keep(model.params, param_shapes(config)), model.hf_config, None)


@pytest.mark.parametrize(
    "family, switch", [(f, s) for f, switches in SWITCHES.items() for s in switches]
)
def test_each_family_switch_matters(family, switch, sharp):
    hf, model = sharp(family)
    tokens = random_tokens(2, 11)
    ref = torch_logits(hf, tokens)
    ours = np.asarray(dem_jax.forward(model, tokens))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert getattr(model.config, switch) != SWITCHES[family][switch]
    changed = without(model, **{switch: SWITCHES[family][switch]})
    assert np.abs(np.asarray(dem_jax.forward(changed, tokens)) - ref).max() > 100 * TOL


# --- decoding -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="config")
def cached_step(params, config, tokens, positions, segments, cache):
    """Last-position logits (B, V) and the updated cache of one cached forward pass."""
    logits, cache = bind(config, params)(tokens, positions, segments, cache)
    return logits[:, -1], cache


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_kv_cache_matches_transformers_generate(family, base):
    _, hf, model = base(family)
    prompts = [[5, 17, 33, 8, 2, 9], [44, 3], [7, 7, 19, 60]]
    tokens, mask = left_pad(prompts, pad_id=0)
    new = 8  # 14 positions: past every family's window
    ours = np.asarray(greedy_generate(model.params, model.config, tokens, mask, new, -1))
    ref = hf.generate(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    np.testing.assert_array_equal(ours, ref.sequences[:, tokens.shape[1] :].numpy())

    # Tied tiny models tend to repeat a token, so the tokens alone prove little: each
    # step's logits through the cache must equal transformers' too.
    cache = init_cache(model.config, len(prompts), tokens.shape[1] + new)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    step_logits, cache = cached_step(model.params, model.config, tokens, positions, mask, cache)
    ones = np.ones((len(prompts), 1), np.int32)
    for step in range(new):
        if step:  # feed the token chosen at the step before
            step_pos = positions[:, -1:] + step
            step_logits, cache = cached_step(
                model.params, model.config, ours[:, step - 1 : step], step_pos, ones, cache
            )
        np.testing.assert_allclose(
            step_logits, ref.logits[step].float().numpy(), atol=TOL, rtol=0, err_msg=str(step)
        )


# --- train -> vectors -> merge -> score -> search, through the CLI -------------------

LR = 1e-2  # the one training step's learning rate
LAMBDA = 0.7  # the task-arithmetic weight of the one fine-tune


def word_records(seed: int, n: int) -> list[dict]:
    """Short texts of the tiny tokenizer's words (each fits a row whole)."""
    rng = np.random.default_rng(seed)
    return [
        {"text": " ".join(f"w{i}" for i in rng.integers(3, VOCAB, rng.integers(4, 12)))}
        for _ in range(n)
    ]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """family -> run directory of one ``dem-jax train`` step from the family's HF base
    on a (fsdp 2, tensor 2) mesh, its fine-tune in run/models/notes; built once. The
    batch is the whole training set (4 records, one padded row each), so the step is
    AdamW's first on the gradient of their mean NLL."""
    cache = {}

    def get(family):
        if family in cache:
            return cache[family]
        hf_dir = base(family)[0]
        root = tmp_path_factory.mktemp(f"run_{family}")
        write_jsonl(root / "train.jsonl", word_records(0, 4))
        write_jsonl(root / "val.jsonl", word_records(1, 5))
        config = {
            "output_dir": str(root / "run"),
            "model": {"path": str(hf_dir)},
            "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
            "data": {
                "seq_len": 32,
                "packing": False,
                "distributions": {"notes": {"train": "train.jsonl", "validation": "val.jsonl"}},
            },
            "train": {
                "steps": 1,
                "batch_size": 4,
                "learning_rate": LR,
                "warmup_steps": 0,
                "schedule": "constant",
                "compute_dtype": "float32",
                "eval_every": 0,
                "eval_batches": 1,
                "log_every": 1,
                "checkpoint_every": 0,
                "keep_checkpoints": 1,
                "async_checkpoint": False,
            },
            "search": {"strategy": "grid", "grid": [0.0, 0.5, 1.0], "batch_size": 4},
        }
        (root / "run.yaml").write_text(yaml.safe_dump(config))
        assert cli.main(["train", str(root / "run.yaml"), "--distribution", "notes"]) == 0
        cache[family] = root
        return root

    return get


def torch_loss_and_grads(hf_dir, records) -> tuple[float, dict[str, np.ndarray]]:
    """Mean NLL of ``records`` (BOS + text + EOS, every token after BOS a target) under
    transformers, and its gradient by parameter name (a tied head's folded in)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(hf_dir)
    total, count = 0.0, 0
    for r in records:
        ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        seq = torch.tensor([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
        logits = model(seq[None]).logits[0]
        total = total + torch.nn.functional.cross_entropy(logits[:-1], seq[1:], reduction="sum")
        count += len(seq) - 1
    loss = total / count
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    return loss.item(), checkpoint_names(grads, hf_dir)


def checkpoint_names(tensors: dict[str, np.ndarray], hf_dir) -> dict[str, np.ndarray]:
    """transformers' in-memory tensors under their checkpoint names (per expert)."""
    names = load_file(hf_dir / "model.safetensors")
    return per_expert_tensors(tensors, mixtral=any(".block_sparse_moe." in n for n in names))


def in_memory_names(state: dict[str, np.ndarray], hf_dir, model) -> dict[str, np.ndarray]:
    """Checkpoint tensors as ``model.load_state_dict`` wants them (experts fused)."""
    want = {n: p.detach().numpy() for n, p in model.named_parameters()}
    split = checkpoint_names(want, hf_dir)  # which checkpoint tensors make each one
    out = {}
    for name, t in want.items():
        if FUSED_EXPERTS.match(name) is None:
            if name in state:
                out[name] = state[name]
            continue
        parts = checkpoint_names({name: t}, hf_dir)
        pieces = [state[k] for k in parts]
        if name.endswith("gate.weight"):
            out[name] = pieces[0]
        elif name.endswith("down_proj"):
            out[name] = np.stack(pieces)
        else:  # gate and up of each expert, expert by expert
            out[name] = np.stack([np.concatenate(pieces[2 * j : 2 * j + 2]) for j in range(len(t))])
    assert set(split) <= set(state)
    return out


def hf_tensors(model) -> dict[str, np.ndarray]:
    """A model's (or a vector's) parameters under their Hugging Face names, float32."""
    return dict(iter_hf_tensors(model.params, model.config, np.float32))


def assert_within_ulps(got, want, name, ulps=4):
    """Every entry of ``got`` within ``ulps`` float32 spacings of ``want``; the tolerance."""
    tol = ulps * np.spacing(np.abs(want))
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{name}: {bad.sum()} entries off, by up to {np.abs(got - want).max()}"
    return tol


def torch_nll(hf_dir, state: dict[str, np.ndarray] | None, records) -> tuple[float, int]:
    """(summed NLL, tokens) of ``records`` by transformers, with the model of ``hf_dir``
    or, given ``state``, that model's architecture holding these weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if state is not None:
        state = in_memory_names(state, hf_dir, model)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        model.tie_weights()
    return torch_reference(model.eval(), load_tokenizer(hf_dir), records)


@pytest.mark.parametrize("family", WITH_MOE)
def test_train_vectors_merge_score(family, base, run, tmp_path, capsys):
    hf_dir = base(family)[0]
    root = run(family)
    ft_dir = root / "run" / "models" / "notes"
    ft = hf_tensors(dem_jax.load_model(ft_dir))
    base_tensors = load_file(hf_dir / "model.safetensors")
    assert set(base_tensors) == set(ft)

    # The step's loss and gradient norm are transformers', and AdamW's first step moves
    # each weight by lr * g / (|g| + eps): -lr * sign(g) wherever the clipped gradient g
    # is well above eps, so every weight's gradient has transformers' sign (the family's
    # q/k and sandwich norms, fused projections and soft-capped logits included).
    loss, grads = torch_loss_and_grads(hf_dir, read_jsonl(root / "train.jsonl"))
    logged = read_jsonl(root / "run" / "logs" / "notes.jsonl")[0]
    assert logged["step"] == 1 and logged["kind"] == "train"
    np.testing.assert_allclose(logged["loss"], loss, rtol=1e-5)
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    np.testing.assert_allclose(logged["grad_norm"], norm, rtol=1e-4)
    assert set(grads) == set(base_tensors)
    checked = 0
    for name, b in base_tensors.items():
        clipped = grads[name] * min(1.0, 1.0 / norm)  # train.grad_clip 1.0
        sure = np.abs(clipped) > 1e-6
        step = ft[name] - b
        assert sure.any(), f"{name}: no gradient"
        np.testing.assert_allclose(
            step[sure], -LR * np.sign(clipped[sure]), rtol=1e-2, err_msg=name
        )
        assert np.all(np.abs(step) <= 1.01 * LR), name
        checked += int(sure.sum())
    assert checked > 0.5 * sum(b.size for b in base_tensors.values())

    # dem-jax vectors: ft - base, one float32 subtraction, and its printed L2 norm.
    vec_dir = tmp_path / "vectors"
    args = ["--base", hf_dir, "--model", f"notes={ft_dir}", "--out", vec_dir, "--json"]
    diagnostics = json.loads(main(capsys, "vectors", *args))
    vector = hf_tensors(load_vector(vec_dir / "notes"))
    assert set(vector) == set(base_tensors)
    for name, b in base_tensors.items():
        np.testing.assert_array_equal(vector[name], ft[name] - b, err_msg=name)
    squares = sum(float(np.sum(np.square(v, dtype=np.float64))) for v in vector.values())
    np.testing.assert_allclose(diagnostics["norms"]["notes"]["total"], math.sqrt(squares), 1e-5)

    # dem-jax merge --format hf: base + λ (ft - base), loaded by transformers as is.
    merge_yaml = tmp_path / "merge.yaml"
    merge_yaml.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(hf_dir),
                "models": [{"model": str(ft_dir), "parameters": {"weight": LAMBDA}}],
                "dtype": "float32",
            }
        )
    )
    merged_dir = tmp_path / "merged"
    main(capsys, "merge", merge_yaml, "--out", merged_dir, "--format", "hf")
    merged = load_file(merged_dir / "model.safetensors")
    assert set(merged) == set(base_tensors)
    moved = total = 0
    for name, b in base_tensors.items():
        want = b + np.float32(LAMBDA) * (ft[name] - b)
        tol = assert_within_ulps(merged[name], want, name)
        moved += int(np.sum(np.abs(want - b) > 10 * tol))
        total += b.size
    assert moved / total > 0.5  # a wrong λ or a missing term cannot pass
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert type(reloaded) is type(base(family)[1])
    assert dem_jax.load_model(merged_dir).config == base(family)[2].config
    state = checkpoint_names({k: v.numpy() for k, v in reloaded.state_dict().items()}, hf_dir)
    for name, array in merged.items():
        np.testing.assert_array_equal(state[name], array, err_msg=name)

    # dem-jax score of the export = transformers' NLL of the reloaded model.
    val = root / "val.jsonl"
    args = ["--data", f"notes={val}", "--json", "--batch-size", "4", "--seq-len", "32"]
    got = json.loads(main(capsys, "score", "--model", merged_dir, *args))["distributions"]["notes"]
    records = read_jsonl(val)
    want_nll, want_tokens = torch_reference(reloaded.eval(), load_tokenizer(merged_dir), records)
    assert got["tokens"] == want_tokens
    np.testing.assert_allclose(got["nll_sum"], want_nll, rtol=2e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(want_nll / want_tokens), rtol=2e-5)


@pytest.mark.parametrize("family", WITH_MOE)
def test_search_scores_each_candidate_like_transformers(family, base, run, capsys):
    hf_dir = base(family)[0]
    root = run(family)
    main(capsys, "search", root / "run.yaml")
    layout = RunLayout(root / "run")
    table = json.loads((layout.search_dir / "candidates.json").read_text())
    chosen = json.loads((layout.search_dir / "chosen.json").read_text())
    objectives = [c["objective"] for c in table["candidates"]]
    assert chosen["objective_value"] == min(objectives)

    # Candidate ω scores as transformers scores base + ω (ft - base), made in numpy.
    records = read_jsonl(root / "val.jsonl")
    base_tensors = load_file(hf_dir / "model.safetensors")
    ft = hf_tensors(dem_jax.load_model(layout.model("notes")))
    omegas = []
    for c in table["candidates"]:
        omega = c["omega"]["notes"]
        omegas.append(omega)
        state = {k: b + np.float32(omega) * (ft[k] - b) for k, b in base_tensors.items()}
        nll, tokens = torch_nll(hf_dir, state, records)
        assert c["scores"]["notes"]["tokens"] == tokens
        np.testing.assert_allclose(c["scores"]["notes"]["mean_nll"], nll / tokens, rtol=2e-5)
        np.testing.assert_allclose(c["objective"], nll / tokens, rtol=2e-5)
    assert sorted(omegas) == [0.0, 0.5, 1.0]
    assert len(set(objectives)) == 3  # the fine-tune really moved the score
    # The chosen model on disk holds base + ω* (ft - base).
    searched = hf_tensors(dem_jax.load_model(layout.merged_model))
    best = chosen["omega"]["notes"]
    for name, b in base_tensors.items():
        assert_within_ulps(searched[name], b + np.float32(best) * (ft[name] - b), name)


# --- mergekit 0.1.5 -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ties_equals_mergekit(family, tmp_path):
    paths = make_family(tmp_path / "models", n=2, case=FAMILY_CASES[family])
    cfg = {
        "merge_method": "ties",
        "models": [
            {"model": str(paths[1]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(paths[2]), "parameters": {"weight": 0.4, "density": 0.3}},
        ],
        "parameters": {"normalize": True},
    }
    ours, theirs = run_both(paths, tmp_path, cfg)
    base_tensors = load_file(paths[0] / "model.safetensors")
    assert sorted(ours) == sorted(base_tensors)
    worst = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
    assert worst <= 1e-6, {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours}
    # Not a trivial merge: every tensor moved off the base (noise scale 0.01).
    for name, b in base_tensors.items():
        assert np.abs(ours[name] - b).max() > 1e-3, name


# --- unsupported architectures -------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, cls",
    [("gpt2", "GPT2LMHeadModel"), ("deepseek_v3", "DeepseekV3ForCausalLM"), ("gpt2", None)],
)
def test_unsupported_architecture_is_one_line(model_type, cls, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    hf = {"model_type": model_type, "vocab_size": VOCAB}
    if cls is not None:
        hf["architectures"] = [cls]
    (src / "config.json").write_text(json.dumps(hf))
    save_file({"lm_head.weight": np.zeros((VOCAB, 8), np.float32)}, src / "model.safetensors")
    code = cli.main(["convert", "hf-to-orbax", str(src), str(tmp_path / "dst")])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert str(src / "config.json") in line and f"model_type {model_type!r}" in line, line
    supported = line.partition("supported: ")[2]
    for family_type in ("llama", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"):
        assert family_type in supported, line
    assert not (tmp_path / "dst").exists()


# --- every merge method on the structural variants ------------------------------------

VALUES = {"weight": 0.5, "t": 0.4, "density": 0.6}  # the required parameters' values


@pytest.fixture(scope="module")
def merge_families(tmp_path_factory):
    """Mixtral (experts: two leading axes, one HF tensor per layer and expert): a base
    and two fine-tunes. (Fused projections are ordinary tensors to a merge.)"""
    root = tmp_path_factory.mktemp("every_method")
    return {"mixtral": make_family(root / "mixtral", n=2, case="mixtral", scale=0.05)}


@pytest.mark.parametrize("family", ["mixtral"])
@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if not m.data])
def test_every_merge_method_runs_on_experts(family, method, merge_families, tmp_path):
    """Each method's output has the base's tensors, finite, and moves off the base;
    exactness per method is tested on Llama against mergekit (test_mergekit_parity*)."""
    m = METHODS[method]
    paths = merge_families[family]
    n = min(m.max_models or 2, 2)
    models = list(paths[1 : 1 + n])
    per_model = {p.name: VALUES[p.name] for p in m.params if p.per_model and p.name in VALUES}
    shared = {p.name: VALUES[p.name] for p in m.params if not p.per_model and p.name in VALUES}
    missing = [p.name for p in m.params if p.default is REQUIRED and p.name not in VALUES]
    assert not missing, f"give {method}'s {missing} a value in VALUES"
    cfg = {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": per_model} for p in models],
        "parameters": shared,
        "dtype": "float32",
    }
    if m.base not in ("ignored", "optional"):  # "optional": the base is one more input
        cfg["base_model"] = str(paths[0])
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    merge_from_config(tmp_path / "merge.yaml", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    base_tensors = load_file(paths[0] / "model.safetensors")
    assert set(out) == set(base_tensors)
    assert all(np.isfinite(t).all() for t in out.values())
    assert any(
        np.abs(out[k] - b).max() > 1e-4
        for k, b in base_tensors.items()
        if ".experts." in k or "qkv" in k
    )
