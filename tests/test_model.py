"""Model properties that need no reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dem_jax
from dem_jax.errors import DemError
from dem_jax.model import transformer as model_lib

CONFIG = dem_jax.ModelConfig(
    vocab_size=67,
    hidden_size=24,
    intermediate_size=40,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
)


def loss(params, config, tokens):
    logits = model_lib.apply(params, config, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])


def test_remat_gives_same_values_and_gradients():
    params = model_lib.init_params(CONFIG, seed=1)
    tokens = jnp.arange(20).reshape(2, 10) % 67
    plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, CONFIG, tokens)
    remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        params, CONFIG.replace(remat=True), tokens
    )
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain[1])) > 0


def test_layers_are_one_scan_not_unrolled():
    """The compiled program holds one while loop over layers, whatever the depth."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    for layers in (2, 9):
        config = CONFIG.replace(num_layers=layers)
        hlo = (
            jax.jit(model_lib.apply, static_argnums=1)
            .lower(model_lib.param_shapes(config), config, tokens)
            .as_text()
        )
        assert hlo.count("stablehlo.while") == 1, layers


def test_every_parameter_has_logical_axes():
    axes = model_lib.param_axes(CONFIG)
    shapes = model_lib.param_shapes(CONFIG)
    for ax, shape in zip(
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        assert len(ax) == len(shape.shape)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == CONFIG.num_params


def test_bfloat16_params():
    config = CONFIG.replace(param_dtype="bfloat16", dtype="bfloat16")
    model = dem_jax.init_model(config)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype("bfloat16")}
    assert np.isfinite(np.asarray(dem_jax.forward(model, np.ones((1, 4), int)))).all()


def test_segment_positions():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(model_lib.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(num_heads=5), "multiple of"),
        (dict(architecture="gpt2"), "architecture"),
        (dict(param_dtype="int8"), "param_dtype"),
        (dict(head_dim=7), "even"),
        (dict(sliding_windows=(4,)), "sliding_windows"),
    ],
)
def test_config_validation(changes, needle):
    with pytest.raises(DemError, match=needle):
        CONFIG.replace(**changes)


def test_config_dict_round_trip():
    config = CONFIG.replace(sliding_windows=(None, 4, 4))
    assert dem_jax.ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(DemError, match="unknown key"):
        dem_jax.ModelConfig.from_dict({**config.to_dict(), "hidden": 3})
