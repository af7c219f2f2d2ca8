"""RegMean: the linear-layer solve against numpy least squares and hand formulas, the
model-level merge against numpy per layer, and the captured Gram matrices against
transformers forward hooks on the same weights (an independent forward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import VOCAB, save_hf_model
from train_helpers import TINY_MODEL

import dem_jax
from dem_jax.data.batches import pad_batches
from dem_jax.data.packing import make_rows
from dem_jax.data.tokenize import Encoding
from dem_jax.errors import DemError
from dem_jax.merge.methods import regmean

# --------------------------------------------------------- one linear layer


def layer_problem(seed, n_models=3, d_in=7, d_out=5):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(int(rng.integers(9, 20)), d_in)) for _ in range(n_models)]
    ws = [rng.normal(size=(d_in, d_out)) for _ in range(n_models)]
    return xs, ws


def test_alpha_one_is_least_squares():
    xs, ws = layer_problem(0)
    grams = np.stack([x.T @ x for x in xs])
    got = regmean.regmean_linear(np.stack(ws), grams, alpha=1.0, ridge=0.0)
    # argmin_W Σ_i ‖X_i W − X_i W_i‖² is least squares on the stacked rows.
    x_all = np.concatenate(xs)
    y_all = np.concatenate([x @ w for x, w in zip(xs, ws, strict=True)])
    expected = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_alpha_shrinks_off_diagonals():
    xs, ws = layer_problem(1)
    grams = [x.T @ x for x in xs]
    # α = 0.3 written out: G̃ = 0.3 G + 0.7 diag(G).
    tilde = [0.3 * g + 0.7 * np.diag(np.diag(g)) for g in grams]
    expected = np.linalg.solve(sum(tilde), sum(t @ w for t, w in zip(tilde, ws, strict=True)))
    got = regmean.regmean_linear(np.stack(ws), np.stack(grams), alpha=0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # α = 0: each input row is the average of the models' rows weighted by ‖X_i[:, k]‖².
    d = np.stack([np.diag(g) for g in grams])  # (N, Din)
    per_row = np.einsum("nk,nko->ko", d, np.stack(ws)) / d.sum(0)[:, None]
    got0 = regmean.regmean_linear(np.stack(ws), np.stack(grams), alpha=0.0)
    np.testing.assert_allclose(got0, per_row, rtol=1e-5, atol=1e-6)


def test_ridge_falls_back_to_the_average_on_unseen_inputs():
    xs, ws = layer_problem(2)
    for x in xs:
        x[:, 3] = 0.0  # input feature 3 never active in any distribution
    grams = np.stack([x.T @ x for x in xs])
    got = np.asarray(regmean.regmean_linear(np.stack(ws), grams, alpha=1.0, ridge=1e-6))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[3], np.mean(ws, axis=0)[3], rtol=1e-4, atol=1e-5)
    # The seen rows still solve the least-squares problem (feature 3 dropped).
    keep = [0, 1, 2, 4, 5, 6]
    x_all = np.concatenate([x[:, keep] for x in xs])
    y_all = np.concatenate([x @ w for x, w in zip(xs, ws, strict=True)])
    expected = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
    np.testing.assert_allclose(got[keep], expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------ model-level merge

CONFIG = TINY_MODEL


def random_grams(config, seed, tokens):
    """Random symmetric positive definite 'Gram sums' of the right shapes."""
    rng = np.random.default_rng(seed)
    c = config

    def spd(n, lead=()):
        a = rng.normal(size=(*lead, n, 2 * n))
        return a @ np.swapaxes(a, -1, -2)

    hd = c.num_heads * c.head_dim
    out = {
        "attn_in": spd(c.hidden_size, (c.num_layers,)),
        "attn_out": spd(hd, (c.num_layers,)),
        "mlp_in": spd(c.hidden_size, (c.num_layers,)),
        "mlp_hidden": spd(c.intermediate_size, (c.num_layers,)),
        "final": spd(c.hidden_size),
        "tokens": np.float32(tokens),
    }
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def test_regmean_merge_per_layer_against_numpy():
    a = dem_jax.init_model(CONFIG, seed=1).params
    rng = np.random.default_rng(5)
    b = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape), a)
    ga, gb = random_grams(CONFIG, 0, 50), random_grams(CONFIG, 1, 20)
    merged = regmean.regmean_merge([a, b], [ga, gb], alpha=0.8, ridge=0.0)

    def expect(wa, wb, g1, g2):
        g1, g2 = g1 / 50, g2 / 20  # normalize=True: mean Gram per token

        def tilde(g):
            return 0.8 * g + 0.2 * np.diag(np.diag(g))

        return np.linalg.solve(tilde(g1) + tilde(g2), tilde(g1) @ wa + tilde(g2) @ wb)

    layer = 1
    d, h, dh = CONFIG.hidden_size, CONFIG.num_heads, CONFIG.head_dim
    q = [
        np.asarray(p["layers"]["attn"]["q_proj"]["kernel"][layer]).reshape(d, h * dh)
        for p in (a, b)
    ]
    got_q = np.asarray(merged["layers"]["attn"]["q_proj"]["kernel"][layer]).reshape(d, h * dh)
    np.testing.assert_allclose(
        got_q, expect(*q, ga["attn_in"][layer], gb["attn_in"][layer]), rtol=2e-3, atol=1e-5
    )
    o = [
        np.asarray(p["layers"]["attn"]["o_proj"]["kernel"][layer]).reshape(h * dh, d)
        for p in (a, b)
    ]
    got_o = np.asarray(merged["layers"]["attn"]["o_proj"]["kernel"][layer]).reshape(h * dh, d)
    np.testing.assert_allclose(
        got_o, expect(*o, ga["attn_out"][layer], gb["attn_out"][layer]), rtol=2e-3, atol=1e-5
    )
    down = [np.asarray(p["layers"]["mlp"]["down_proj"]["kernel"][0]) for p in (a, b)]
    np.testing.assert_allclose(
        merged["layers"]["mlp"]["down_proj"]["kernel"][0],
        expect(*down, ga["mlp_hidden"][0], gb["mlp_hidden"][0]),
        rtol=2e-3,
        atol=1e-5,
    )
    head = [np.asarray(p["lm_head"]["kernel"]) for p in (a, b)]
    np.testing.assert_allclose(
        merged["lm_head"]["kernel"], expect(*head, ga["final"], gb["final"]), rtol=2e-3, atol=1e-5
    )
    # Not a linear layer: the plain mean.
    for path in (("embed", "embedding"), ("final_norm", "scale")):
        pa, pb, pm = a, b, merged
        for k in path:
            pa, pb, pm = pa[k], pb[k], pm[k]
        np.testing.assert_allclose(pm, (np.asarray(pa) + np.asarray(pb)) / 2, rtol=1e-6)
    # Identical models merge to themselves, whatever the Grams.
    same = regmean.regmean_merge([a, a], [ga, gb])
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(a), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    with pytest.raises(DemError):
        regmean.regmean_merge([a, b], [ga, {k: v for k, v in gb.items() if k != "final"}])


# --------------------------------------- Gram capture vs transformers hooks


def documents(seed, n_docs=5, max_len=12):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(rng.integers(3, max_len + 1))) for _ in range(n_docs)]


def hf_grams(hf_model, docs):
    """Σ over every token of every document of x xᵀ at each Linear's input, by hooks."""
    import torch

    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1]).numpy()
            sums[name] = sums.get(name, 0.0) + x.T @ x

        return fn

    handles = []
    for i, layer in enumerate(hf_model.model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(f"attn_in/{i}")))
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook(f"attn_out/{i}")))
        handles.append(layer.mlp.gate_proj.register_forward_hook(hook(f"mlp_in/{i}")))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook(f"mlp_hidden/{i}")))
    if not hf_model.config.tie_word_embeddings:
        handles.append(hf_model.lm_head.register_forward_hook(hook("final")))
    with torch.no_grad():
        for doc in docs:  # one document at a time: no padding, positions from 0
            hf_model(torch.tensor(doc[None]))
    for h in handles:
        h.remove()
    return sums


@pytest.mark.parametrize(
    "case, overrides",
    [
        ("mistral", {}),  # GQA, sliding window 5 < document length, untied lm_head
        ("llama_bias_headdim", {"head_dim": 6, "tie_word_embeddings": True}),  # H·Dh ≠ D
    ],
)
def test_gram_capture_matches_transformers_hooks(tmp_path, case, overrides):
    hf_model = save_hf_model(case, tmp_path, tokenizer=False, **overrides)
    model = dem_jax.load_model(tmp_path)
    docs = documents(0)
    # Packed rows with padding: segment masks and per-document positions must make
    # the sums equal to running each document alone.
    encodings = [
        Encoding(np.append(d, 0).astype(np.int32), np.ones(len(d) + 1, bool)) for d in docs
    ]
    batches = pad_batches(make_rows(encodings, 16, packing=True), 2)
    got = regmean.gram_matrices(model.params, model.config, batches)
    expected = hf_grams(hf_model, docs)
    assert float(got["tokens"]) == sum(len(d) for d in docs)
    assert ("final" in got) == (not model.config.tie_embeddings)
    for name, value in expected.items():
        key, _, layer = name.partition("/")
        actual = np.asarray(got[key][int(layer)] if layer else got[key], np.float64)
        assert actual.shape == value.shape, name
        np.testing.assert_allclose(
            actual, value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=name
        )
    if not model.config.tie_embeddings:
        return
    # The merge runs on captured Grams (tied: no lm_head Gram, the embedding is averaged).
    merged = regmean.regmean_merge([model.params, model.params], [got, got])
    assert jax.tree.structure(merged) == jax.tree.structure(model.params)
    q = merged["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(
        q, model.params["layers"]["attn"]["q_proj"]["kernel"], rtol=1e-3, atol=1e-4
    )
    assert q.dtype == jnp.float32
