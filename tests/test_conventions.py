"""The conventions where Flax/Keras and PyTorch differ, each switch checked against the
PyTorch rule written out by hand: plateau patience, BatchNorm's running variance, the
weight-norm initialisation, and float64 schedules under x64."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.nn.layers import BatchNorm, WeightNormDense
from jtricks.optim import build_optimizer, build_schedule
from jtricks.training import create_train_state
from jtricks.training.callbacks import ReduceLROnPlateau

LOSSES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.85, 0.9, 0.9, 0.9, 0.9, 0.9]


def torch_plateau_scales(losses, factor, patience):
    """PyTorch's ReduceLROnPlateau (mode min, threshold_mode abs, threshold 0, cooldown 0)."""
    best, bad, lr, out = math.inf, 0, 1.0, []
    for v in losses:
        if v < best:
            best, bad = v, 0
        else:
            bad += 1
        if bad > patience:
            lr, bad = lr * factor, 0
        out.append(lr)
    return out


def keras_plateau_scales(losses, factor, patience):
    """Keras' ReduceLROnPlateau (min_delta 0, cooldown 0)."""
    best, wait, lr, out = math.inf, 0, 1.0, []
    for v in losses:
        if v < best:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                lr, wait = lr * factor, 0
        out.append(lr)
    return out


@pytest.mark.parametrize("mode", ["keras", "pytorch"])
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_plateau_patience_modes_match_keras_and_pytorch(mode, patience):
    tx = build_optimizer("sgd", 0.1, plateau=True)
    state = create_train_state(MLP(2, features=()), tx, np.zeros((1, 3)), jax.random.key(0))
    cb = ReduceLROnPlateau(0.5, patience, min_scale=1e-6, patience_mode=mode)
    scales = []
    for v in LOSSES:
        state = cb.on_epoch_end({"val_loss": v}, state) or state
        scales.append(float(optax.tree_utils.tree_get(state.opt_state, "plateau_scale")))
    reference = (keras_plateau_scales if mode == "keras" else torch_plateau_scales)(
        LOSSES, 0.5, patience
    )
    assert scales == reference
    if mode == "pytorch":  # the two conventions really differ on this sequence
        assert reference != keras_plateau_scales(LOSSES, 0.5, patience)


def test_bad_patience_mode():
    with pytest.raises(ConfigError, match="patience_mode must be one of keras, pytorch"):
        ReduceLROnPlateau(patience_mode="tf")
    with pytest.raises(ConfigError, match="patience_mode"):
        build_schedule("plateau(patience_mode='tf')", 0.1, steps_per_epoch=1, total_steps=1)


X = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 3)).astype(np.float32)


def test_batch_norm_unbiased_running_variance_is_pytorch_rule():
    bn = BatchNorm(use_running_average=False, momentum=0.9)
    variables = bn.init(jax.random.key(0), X)
    y, updated = bn.apply(variables, X, mutable=["batch_stats"])
    flat = X.reshape(-1, 3).astype(np.float64)
    mean, var_b, var_u = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var_u, rtol=1e-5)  # PyTorch's rule
    np.testing.assert_allclose(y, (X - mean) / np.sqrt(var_b + 1e-5), rtol=1e-4, atol=1e-5)
    # Flax's BatchNorm: the same outputs, the biased variance in the running average
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    fy, fupd = flax_bn.apply(flax_bn.init(jax.random.key(0), X), X, mutable=["batch_stats"])
    np.testing.assert_allclose(y, fy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fupd["batch_stats"]["var"], 0.9 + 0.1 * var_b, rtol=1e-5)
    # evaluation uses the running statistics
    ev = BatchNorm(use_running_average=True).apply({**variables, **updated}, X)
    expected = (X - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(ev, expected, rtol=1e-5, atol=1e-6)


def test_batch_unbiased_models_keep_flax_parameter_names():
    a = jax.eval_shape(MLP(3, features=(4,), norm="batch").init, jax.random.key(0), X[:, 0])
    b = jax.eval_shape(
        MLP(3, features=(4,), norm="batch_unbiased").init, jax.random.key(0), X[:, 0]
    )
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_weight_scaled_keeps_the_initialiser_scale():
    x = X[:, 0]
    layer = WeightNormDense(4, kernel_init=nn.initializers.normal(5.0))
    params = layer.init(jax.random.key(1), x)["params"]
    v = np.asarray(params["kernel"], np.float64)
    np.testing.assert_allclose(params["scale"], np.linalg.norm(v, axis=0), rtol=1e-6)  # g = ||v||
    np.testing.assert_allclose(layer.apply({"params": params}, x), x @ v, rtol=1e-5, atol=1e-5)
    # after g moves, w = g v / ||v|| (PyTorch's weight_norm, dim over the input axis)
    g = np.array([0.5, 1.0, 2.0, 3.0])
    moved = {**params, "scale": jnp.asarray(g, jnp.float32)}
    w = g * v / np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(layer.apply({"params": moved}, x), x @ w, rtol=1e-5, atol=1e-5)
    # Flax's WeightNorm ("weight") starts at unit-norm columns instead
    flax_layer = nn.WeightNorm(nn.Dense(4, kernel_init=nn.initializers.normal(5.0)))
    fp = flax_layer.init(jax.random.key(1), x)
    out = flax_layer.apply(fp, np.eye(3, dtype=np.float32)) - flax_layer.apply(fp, np.zeros((3, 3)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("spec", "formula"),
    [
        ("exponential(rate=0.05)", lambda t: 0.1 * math.exp(-0.05 * t / 10)),
        ("per_epoch(factor=0.98)", lambda t: 0.1 * 0.98 ** (t // 10)),
        ("cosine", lambda t: 0.1 * 0.5 * (1 + math.cos(math.pi * t / 100))),
    ],
)
def test_schedules_are_float64_under_x64(spec, formula):
    with jax.enable_x64(True):
        schedule = build_schedule(spec, 0.1, steps_per_epoch=10, total_steps=100)
        value = schedule(jnp.asarray(37, jnp.int32))  # optax's int32 step count
        assert value.dtype == jnp.float64
        assert float(value) == pytest.approx(formula(37), rel=1e-14)
        tx = build_optimizer("sgd", 0.1, plateau=True)
        scale = optax.tree_utils.tree_get(tx.init({"w": jnp.ones(2)}), "plateau_scale")
        assert scale.dtype == jnp.float64
    assert schedule(jnp.asarray(37, jnp.int32)).dtype == jnp.float32  # float32 otherwise
