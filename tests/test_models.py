"""Models: shapes, the paper's CNN geometry, dropout keys, initialisers, registry errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtricks.errors import ConfigError
from jtricks.nn import CNN1D, MLP, MODELS, build_model
from jtricks.nn.initializers import get_initializer


def test_cnn_matches_paper_geometry(key):
    x = jnp.ones((2, 40))
    model = CNN1D()
    variables = model.init(key, x)
    params = variables["params"]
    shapes = {k: v["kernel"].shape for k, v in params.items()}
    assert shapes == {
        "Conv_0": (5, 1, 25),
        "Conv_1": (3, 25, 25),
        "Conv_2": (3, 25, 25),
        "Dense_0": (125, 10),  # 25 channels x length 5
    }
    assert model.apply(variables, x).shape == (2, 10)
    # paper's PyTorch model: 5210 parameters
    assert sum(p.size for p in jax.tree.leaves(params)) == 5210


def test_cnn_matches_lax_conv_reference(key):
    """Second code path: the conv stack written out with lax.conv_general_dilated."""
    x = jax.random.normal(key, (3, 40))
    model = CNN1D()
    params = model.init(key, x)["params"]
    h = x[..., None]
    for name in ("Conv_0", "Conv_1", "Conv_2"):
        p = params[name]
        h = jax.lax.conv_general_dilated(
            h, p["kernel"], (2,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC")
        )
        h = jax.nn.relu(h + p["bias"])
    expect = h.reshape(3, -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), expect, rtol=1e-5, atol=1e-5)


def test_mlp_paper_shape_and_images(key):
    x = jnp.ones((2, 4, 4, 3))
    model = MLP(num_classes=5, features=(8, 6))
    variables = model.init(key, x)
    assert model.apply(variables, x).shape == (2, 5)
    paper = MLP().init(key, jnp.ones((1, 40)))["params"]
    assert (
        sum(p.size for p in jax.tree.leaves(paper))
        == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    )


def test_dropout_needs_key_in_training_and_is_off_in_eval(key):
    x = jnp.ones((4, 40))
    model = MLP(dropout=0.5)
    variables = model.init(key, x)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True)
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_uniform_initializer_is_pytorch_default(key):
    w = get_initializer("uniform")(key, (400, 300), jnp.float32)
    bound = 1 / np.sqrt(400)
    assert float(jnp.abs(w).max()) <= bound
    np.testing.assert_allclose(float(w.var()), bound**2 / 3, rtol=0.05)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("transformer", "valid models are: cnn, mlp"),
        ("mlp(width=3)", "valid arguments are"),
        ("mlp(dropout=1.0)", "dropout"),
        ("mlp(activation='swishy')", "valid activations"),
        ("cnn(initializer='zeros')", "valid initializers"),
        ("cnn(channels=(4, 4), kernel_sizes=(3,), strides=(1, 1))", "equal lengths"),
        ("mlp(features=(0,))", "positive"),
        ("mlp(", "cannot parse"),
    ],
)
def test_bad_model_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(spec, 10)


def test_registry():
    assert set(MODELS) == {"mlp", "cnn"}
    assert build_model("mlp(features=(7,))", 3).features == (7,)
