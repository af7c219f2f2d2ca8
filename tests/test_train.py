"""Training: learning, optimizer maths, sharding equivalence, configs."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from train_helpers import ROOT, load_params, tiny_config

import dem_jax
from dem_jax.config.loader import load_run_config
from dem_jax.config.run import TrainConfig
from dem_jax.data.pipeline import load_splits
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.errors import DemError
from dem_jax.train.loop import run_training
from dem_jax.train.optimizer import learning_rate_schedule
from dem_jax.train.step import init_state, train_step


def unigram_nll(train_rows, val_rows, vocab: int) -> float:
    """Validation NLL of an add-one unigram model fitted on the training targets."""
    counts = np.ones(vocab)
    for r in train_rows:
        np.add.at(counts, r["targets"][r["loss_mask"] > 0], 1)
    logp = np.log(counts / counts.sum())
    val = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in val_rows])
    return float(-logp[val].mean())


def test_tiny_model_learns_synthetic_task(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=80", "train.eval_every=0", "train.checkpoint_every=0")
    result = run_training(cfg, "text", log=lambda *_: None)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train, val = load_splits(cfg.data, tokenizer, "text")
    base = run_initial_eval(cfg)
    final = result.final_eval["text"]["nll"]
    unigram = unigram_nll(train.rows, val.rows, 55)
    assert base > 3.5  # ~ln(55) for a random init
    assert final < 0.6 * unigram < base, (final, unigram, base)
    metrics = [json.loads(x) for x in (tmp_path / "logs" / "text.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(10, 81, 10))
    assert {m["kind"] for m in metrics} >= {"eval/text", "eval/arithmetic"}
    assert list((tmp_path / "tensorboard" / "text").glob("events.out.tfevents*"))


def run_initial_eval(cfg) -> float:
    """Validation NLL of the run's (saved) base model."""
    from dem_jax.model.losses import batch_nll

    base = dem_jax.load_model(Path(cfg.output_dir) / "models" / "base")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    _, val = load_splits(cfg.data, tokenizer, "text")
    from dem_jax.data.packing import stack_rows

    total, count = batch_nll(base.params, base.config, stack_rows(val.rows))
    return float(total / count)


def test_grad_accumulation_is_the_same_maths():
    config = dem_jax.ModelConfig(
        vocab_size=31,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
    )
    params = dem_jax.init_model(config, seed=0).params
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 31, (4, 8)).astype(np.int32),
        "targets": rng.integers(0, 31, (4, 8)).astype(np.int32),
        "loss_mask": (rng.random((4, 8)) < 0.6).astype(np.float32),
        "segment_ids": np.ones((4, 8), np.int32),
        "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
    }
    tx = optax.sgd(0.1)
    step = jax.jit(train_step, static_argnames=("config", "tx", "accum"))
    one, m1 = step(init_state(params, tx), batch, config=config, tx=tx, accum=1)
    two, m2 = step(init_state(params, tx), batch, config=config, tx=tx, accum=2)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_schedule_shape():
    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(lr(100)) == pytest.approx(0.1, rel=1e-5)
    linear = learning_rate_schedule(
        TrainConfig(
            steps=20, warmup_steps=0, schedule="linear", learning_rate=1.0, min_lr_ratio=0.0
        )
    )
    assert float(linear(10)) == pytest.approx(0.5)


def test_mesh_training_matches_one_device(tmp_path):
    common = [
        "train.steps=6",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "train.batch_size=8",
    ]
    one = tiny_config(tmp_path / "one", *common, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
    mesh = tiny_config(tmp_path / "mesh", *common, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4")
    r1 = run_training(one, "sort", log=lambda *_: None)
    r2 = run_training(mesh, "sort", log=lambda *_: None)
    losses = [
        [
            json.loads(x)["loss"]
            for x in (p / "logs" / "sort.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"
        ]
        for p in (tmp_path / "one", tmp_path / "mesh")
    ]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    for a, b in zip(load_params(r1.model_dir), load_params(r2.model_dir), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_mixture_uses_all_distributions(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "train.steps=3",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "data.mixture={arithmetic: 3, sort: 1}",
    )
    result = run_training(cfg, "mixture", log=lambda *_: None)
    meta = json.loads((result.model_dir / "dem_jax_model.json").read_text())
    mixture = meta["metadata"]["mixture"]
    assert mixture == {"arithmetic": 0.75, "reverse": 0.0, "sort": 0.25, "text": 0.0}


def test_every_shipped_config_parses():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_run_config(path)
        assert cfg.train.steps > 0, path


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stepz=3", "unknown key 'stepz'"),
        ("train.steps=abc", "train.steps: expected int"),
        ("train.grad_accum=3", "divisible"),
        ("data.mixture=bogus", "data.mixture"),
    ],
)
def test_bad_config_values(tmp_path, override, needle):
    with pytest.raises(DemError, match=needle):
        tiny_config(tmp_path, override)
