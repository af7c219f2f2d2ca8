"""`dem-jax plan`: TPU slices, architectures without weights, and the per-device memory
plan checked by hand, against real sharded arrays and optimizer state, and against
XLA's own buffer assignment for the compiled train step."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml
from hf_models import CASES, build_hf_model

import dem_jax
from dem_jax import cli
from dem_jax.config.loader import load_run_config
from dem_jax.config.model import ModelConfig
from dem_jax.config.run import MeshConfig, TrainConfig
from dem_jax.errors import DemError
from dem_jax.io.hf.config import from_hf_config
from dem_jax.plan.architectures import KNOWN_ARCHITECTURES, known_architecture
from dem_jax.plan.memory import activation_bytes, plan_memory, sharded_param_elements
from dem_jax.plan.tpu import TPU_GENERATIONS, GiB, parse_slice

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TPU_CONFIGS = sorted((CONFIGS / "tpu").glob("*.yaml"))


def run_plan(capsys, *argv):
    """`dem-jax plan ...` as the CLI runs it: (exit status, stdout, stderr)."""
    code = cli.main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------


def test_every_shipped_yaml_parses():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(TPU_CONFIGS) >= 4 and set(TPU_CONFIGS) <= set(files)
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict), path
        if "merge_method" in data:  # a mergekit-style MERGE.yaml, not a run config
            continue
        cfg = load_run_config(path)
        assert cfg.train.batch_size % cfg.train.grad_accum == 0, path


def test_gs_paths_survive_loading():
    cfg = load_run_config(CONFIGS / "tpu" / "openllama-7b-v4-32.yaml")
    assert cfg.output_dir.startswith("gs://")
    assert cfg.model.path.startswith("gs://")
    assert all(d.train.startswith("gs://") for d in cfg.data.distributions.values())


def test_every_tpu_config_has_a_target():
    assert TPU_CONFIGS
    for path in TPU_CONFIGS:
        cfg = load_run_config(path)
        assert cfg.model.arch in KNOWN_ARCHITECTURES
        parse_slice(cfg.mesh.slice)


@pytest.mark.parametrize("path", TPU_CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_fits_its_slice(capsys, path):
    code, out, err = run_plan(capsys, path, "--json")
    assert code == 0, err
    plan = json.loads(out)
    cfg = load_run_config(path)
    arch, slice_name = cfg.model.arch, cfg.mesh.slice
    assert plan["fits"] and plan["total"] <= plan["usable"]
    assert plan["slice"]["accelerator_type"] == slice_name
    assert plan["model"]["source"] == arch
    assert plan["model"]["num_params"] == known_architecture(arch).num_params
    assert (
        plan["mesh"]["fsdp"] * plan["mesh"]["data"] * plan["mesh"]["tensor"]
        == (plan["slice"]["devices"])
    )


def test_oversized_plan_exits_2(capsys):
    # OpenLLaMA 13B with float32 AdamW state on 16 chips of 16 GiB cannot fit.
    path = CONFIGS / "tpu" / "openllama-13b-v5p-32.yaml"
    code, out, err = run_plan(capsys, path, "--slice", "v5e-16")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "v5litepod-16" in errors[0]
    assert "Traceback" not in err
    assert "does not fit" in out and "total" in out  # the table is still printed
    # The same config on its own slice fits; overrides after options are applied.
    assert run_plan(capsys, path, "--slice", "v5p-32", "train.grad_accum=2")[0] == 0


def test_plan_table_and_overrides(capsys):
    path = CONFIGS / "tpu" / "openllama-7b-v4-32.yaml"
    code, out, _ = run_plan(capsys, path)
    assert code == 0
    for text in ("v4-32: 16 chips, 16 devices, 4 hosts", "fsdp=16", "AdamW moments", "fits:"):
        assert text in out
    remat = json.loads(run_plan(capsys, path, "--json")[1])
    no_remat = json.loads(run_plan(capsys, path, "--json", "train.remat=false")[1])
    assert no_remat["bytes_per_device"]["activations"] > remat["bytes_per_device"]["activations"]


# --------------------------------------------------------------------------
# Slices and architectures
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, accel, chips, devices, hosts, hbm_gib",
    [
        ("v4-8", "v4-8", 4, 4, 1, 32),  # v4 counts TensorCores, 2 per chip
        ("v4-32", "v4-32", 16, 16, 4, 32),
        ("v5litepod-16", "v5litepod-16", 16, 16, 2, 16),  # v5e counts chips
        ("v5e-16", "v5litepod-16", 16, 16, 2, 16),
        ("v5p-32", "v5p-32", 16, 16, 4, 95),  # v5p counts TensorCores
        ("v6e-8", "v6e-8", 8, 8, 1, 32),
        ("v3-8", "v3-8", 4, 8, 1, 16),  # no megacore: each core is a device
    ],
)
def test_slice_names(name, accel, chips, devices, hosts, hbm_gib):
    s = parse_slice(name)
    assert (s.accelerator_type, s.chips, s.devices, s.hosts) == (accel, chips, devices, hosts)
    assert s.hbm_per_device == hbm_gib * GiB


@pytest.mark.parametrize("bad", ["v4-7", "v9-8", "tpu-8", "v5p-3", "v4"])
def test_bad_slice_names(bad):
    with pytest.raises(DemError, match="--slice"):
        parse_slice(bad)


# Published parameter counts (the models' own model cards / safetensors totals).
PUBLISHED_PARAMS = {
    "openllama-3b": 3_426_473_600,
    "openllama-7b": 6_738_415_616,
    "openllama-13b": 13_015_864_320,
    "llama-2-7b": 6_738_415_616,
    "mixtral-8x7b": 46_702_792_704,
    "gemma-2-9b": 9_241_705_984,
    "qwen3-8b": 8_190_735_360,
    "phi-3-mini": 3_821_079_552,
    "qwen3-30b-a3b": 30_532_122_624,
    "olmo-2-7b": 7_298_617_344,
}


@pytest.mark.parametrize("arch", sorted(KNOWN_ARCHITECTURES))
def test_known_architecture_param_count(arch):
    config = known_architecture(arch)
    counted = sharded_param_elements(config, {"data": 1, "fsdp": 1, "tensor": 1})["total"]
    assert counted == config.num_params == PUBLISHED_PARAMS[arch]


def test_model_config_sources(capsys, tmp_path):
    hf = {**KNOWN_ARCHITECTURES["openllama-3b"], "num_hidden_layers": 2}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(hf))
    tpu = CONFIGS / "tpu" / "openllama-7b-v4-32.yaml"
    for source in (tmp_path / "model", tmp_path / "model" / "config.json"):
        code, out, _ = run_plan(capsys, tpu, "--model-config", source, "--json")
        assert code == 0 and json.loads(out)["model"]["num_layers"] == 2
    code, out, _ = run_plan(capsys, tpu, "--model-config", "llama-2-7b", "--json")
    assert json.loads(out)["model"]["max_position_embeddings"] == 4096
    # model.init (the tiny config) needs no architecture, only a slice.
    code, out, _ = run_plan(capsys, CONFIGS / "tiny.yaml", "--slice", "v4-8", "--json")
    assert code == 0 and json.loads(out)["model"]["source"] == "model.init"


def test_unplannable_input_is_one_line(capsys, tmp_path):
    tiny = CONFIGS / "tiny.yaml"
    cases = [
        ((tiny,), "which TPU slice"),
        ((tiny, "--slice", "v4-8", "mesh.tensor=3"), "mesh"),
        ((tiny, "--slice", "v4-8", "train.batch_size=6"), "does not split"),
        ((tiny, "--slice", "v4-8", "--model-config", tmp_path / "nope"), "nope"),
        ((CONFIGS / "tpu" / "openllama-3b-v4-8.yaml", "--slice", "v99-8"), "unknown TPU slice"),
    ]
    for argv, needle in cases:
        code, _, err = run_plan(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
    # A config outside the shipped table whose model.path is not readable here.
    other = tmp_path / "mine.yaml"
    other.write_text("output_dir: out\nmodel: {path: gs://b/m}\n")
    code, _, err = run_plan(capsys, other, "--slice", "v4-8")
    assert code == 2 and "--model-config" in err


# --------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------

# D=6 (fsdp=2 divides it), F=10, H=2 (tensor=2 divides), K=1 (does not: replicated),
# Dh=4, V=11 (does not divide: replicated), L=2.
TINY = ModelConfig(
    vocab_size=11,
    hidden_size=6,
    intermediate_size=10,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
)


def test_hand_computed_plan():
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    # Per layer, elements per device: q (6,2,4) -> 3*1*4 = 12; k and v (6,1,4) -> 3*1*4
    # = 12 each (the one KV head stays whole); o (2,4,6) -> 1*4*3 = 12; gate, up (6,10)
    # and down (10,6) -> 3*5 = 15 each; two norms 6 each, replicated.
    layer = 12 + 12 + 12 + 12 + 3 * 15 + 2 * 6
    # embedding (11,6) and lm_head (6,11): vocab replicated, width halved -> 33 each.
    per_device = 2 * layer + 33 + 33 + 6
    assert per_device == 282
    # Whole model: layer = 48 + 24 + 24 + 48 + 180 + 12 = 336.
    assert TINY.num_params == 2 * 336 + 66 + 66 + 6 == 810
    # Gathered over fsdp (tensor split kept): layer = 24+24+24+24+30+30+30+12 = 198.
    elems = sharded_param_elements(TINY, mesh)
    assert elems == {"total": 810, "per_device": 282, "layer_gathered": 198, "vocab_gathered": 132}

    train = TrainConfig(batch_size=8, grad_accum=2, remat=True, param_dtype="float32")
    plan = plan_memory(TINY, train, 5, MeshConfig(**mesh), parse_slice("v4-8"))
    assert plan.rows_per_device == 2  # 8 / 2 micro-batches / (data 1 * fsdp 2)
    # Activations, b=2, T=5, c=2 (bfloat16), h=1 head per device, k=1, f=5, v=11:
    # per token: D(4c+8) + (h+2k)Dh c + h Dh c + 5 f c = 96 + 24 + 8 + 50 = 178
    # per layer: b T 178 + b T T h (4+c+1) = 1780 + 350 = 2130
    # head: b T (D(4+c) + v(c+8)) = 10 * (36 + 110) = 1460
    # remat: L b T D c + A_layer + A_head = 240 + 2130 + 1460
    assert plan.activations == {
        "layer": 2130,
        "saved": 240,
        "working": 2130,
        "head": 1460,
        "total": 3830,
    }
    assert plan.parts == {
        "params": 282 * 4,
        "optimizer": 2 * 282 * 4,
        "gradients": 282 * 4,
        "grad_accum": 282 * 4,
        "gathered": (2 * 198 + 132) * 2,
        "activations": 3830,
    }
    assert plan.total == 5 * 282 * 4 + 528 * 2 + 3830
    bf16 = plan_memory(
        TINY, TrainConfig(batch_size=8, param_dtype="bfloat16"), 5, mesh, parse_slice("v4-8")
    )
    assert bf16.parts["params"] == 282 * 2 and bf16.parts["optimizer"] == 2 * 282 * 2
    no_remat = activation_bytes(TINY, 2, 5, "bfloat16", 2, remat=False)
    # Without remat a layer keeps its input and matmul outputs for the backward pass:
    # b T (2D + (h+2k)Dh + 2f) c = 10 * (12 + 12 + 10) * 2 = 680 per layer; L = 2.
    assert no_remat["saved"] == 2 * 680
    # saved + one layer in flight (less its saved part, already counted) + head
    assert no_remat["total"] == 2 * 680 + (2130 - 680) + 1460


def _bytes_on(tree, device) -> int:
    shards = [s for x in jax.tree.leaves(tree) for s in x.addressable_shards]
    return sum(s.data.nbytes for s in shards if s.device == device)


@pytest.fixture(scope="module")
def sharded_state():
    """Parameters placed by dem_jax.sharding's rules on 8 devices, the trainer's AdamW
    state for them, and the plan."""
    from dem_jax.model.transformer import param_shapes
    from dem_jax.sharding.rules import param_shardings
    from dem_jax.train.optimizer import make_optimizer
    from dem_jax.train.step import init_state

    mesh_sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    config = ModelConfig(
        vocab_size=101,  # not divisible by tensor=4: replicated
        hidden_size=24,
        intermediate_size=40,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,  # not divisible by tensor=4: replicated
    )
    train = TrainConfig(batch_size=8)
    params = jax.tree.map(
        lambda s, sharding: jax.device_put(jnp.zeros(s.shape, s.dtype), sharding),
        param_shapes(config),
        param_shardings(config, dem_jax.make_mesh(**mesh_sizes)),
    )
    state = init_state(params, make_optimizer(train))
    return state, plan_memory(config, train, 16, mesh_sizes, parse_slice("v5litepod-8"))


def test_plan_matches_real_sharded_params(sharded_state):
    state, plan = sharded_state
    for device in jax.devices():
        assert _bytes_on(state["params"], device) == plan.parts["params"]


def test_plan_matches_real_sharded_optimizer_state(sharded_state):
    state, plan = sharded_state
    for device in jax.devices():
        # The plan leaves out the optimizer's int32 step counters (a few bytes).
        counters = sum(4 for x in jax.tree.leaves(state["opt_state"]) if x.ndim == 0)
        assert _bytes_on(state["opt_state"], device) - counters == plan.parts["optimizer"]


# Families whose layers hold more than Llama's: sandwich norms, soft-capped scores and
# logits (Gemma 2), and a mixture of experts that runs every expert on every token.
GEMMA2 = dict(
    architecture="gemma2",
    norm_placement="sandwich",
    norm_kind="gemma",
    hidden_act="gelu_tanh",
    embed_scale=True,
    attn_softcap=50.0,
    final_softcap=30.0,
    tie_embeddings=True,
)
MOE = dict(architecture="mixtral", num_experts=4, experts_per_token=2, moe_intermediate_size=96)


@pytest.mark.parametrize(
    "remat, rows, accum, vocab, family",
    [
        (True, 2, 2, 1024, {}),
        (False, 4, 1, 1024, {}),
        (False, 4, 1, 32768, {}),
        (False, 4, 1, 1024, GEMMA2),
        (False, 4, 1, 1024, MOE),
    ],
    # 4 x 256 x 32768 logits: 4 chunks
    ids=["remat-accum", "no-remat", "chunked-loss", "gemma2", "mixtral"],
)
def test_plan_against_xla_buffer_assignment(remat, rows, accum, vocab, family):
    """Compile the real train step (abstract inputs, nothing allocated) and compare the
    plan with XLA's peak: arguments + outputs - donated aliases + temporaries. Float32
    compute, since XLA:CPU keeps bfloat16 intermediates in float32."""
    from dem_jax.model.transformer import param_shapes
    from dem_jax.train.optimizer import make_optimizer
    from dem_jax.train.step import train_step

    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=344,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        **family,
    )
    seq = 256
    train = TrainConfig(
        batch_size=rows * accum,
        grad_accum=accum,
        remat=remat,
        param_dtype="float32",
        compute_dtype="float32",
    )
    one_device = parse_slice("v5litepod-1")
    plan = plan_memory(config, train, seq, {"data": 1, "fsdp": 1, "tensor": 1}, one_device)

    tx = make_optimizer(train)
    state = jax.eval_shape(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.int32(0)},
        param_shapes(config),
    )
    batch = {
        k: jax.ShapeDtypeStruct((rows * accum, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    }
    run_config = config.replace(dtype="float32", remat=remat)
    step = functools.partial(train_step, config=run_config, tx=tx, accum=accum)
    memory = jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    ratio = plan.total / peak
    assert 1.0 <= ratio <= 1.25, (plan.parts, peak, ratio)


def test_tpu_generations_are_consistent():
    for gen in TPU_GENERATIONS.values():
        per = gen.cores_per_chip if gen.suffix_counts == "cores" else 1
        s = parse_slice(f"{gen.name}-{per * 4}")
        assert s.chips == 4 and s.devices == 4 * gen.devices_per_chip
        assert s.hbm_per_device == gen.hbm_per_device


@pytest.mark.parametrize("case", sorted(CASES))
def test_param_count_of_every_family_matches_transformers(case):
    """The planner's parameter count (ModelConfig.num_params and the sharded leaves)
    is the transformers model's, for every family and mixture of experts."""
    hf = build_hf_model(case)
    config = from_hf_config(hf.config.to_dict())
    expected = sum(p.numel() for p in hf.parameters())  # a tied matrix counted once
    mesh = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert config.num_params == sharded_param_elements(config, mesh)["total"] == expected
