"""Training under `jax.enable_x64`: a float64 model trains and is evaluated in float64
(against a hand-written float64 loop), and float64 inputs train a float32 model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks import create_train_state, evaluate, fit
from jtricks.nn import MLP

F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}


class Float64MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3, **F64)(nn.tanh(nn.Dense(8, **F64)(x)))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 5)), rng.integers(0, 3, 40)


def _loss(params, x, y):
    logp = jax.nn.log_softmax(Float64MLP().apply({"params": params}, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_float64_model_trains_and_evaluates_in_float64(accumulate):
    with jax.enable_x64(True):
        x, y = _data()
        state = create_train_state(Float64MLP(), optax.sgd(0.5), x, jax.random.key(0))
        params = jax.tree.map(np.array, state.params)  # fit donates the state's buffers
        state, history = fit(
            state,
            (x, y),
            val_data=(x, y),
            batch_size=40 // accumulate,
            epochs=3,
            accumulate=accumulate,
            log_every_steps=1,
        )
        losses = []
        for _ in range(3):
            loss, grads = jax.value_and_grad(_loss)(params, x, y)
            losses.append(float(loss))
            params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(history["train_loss"], losses, rtol=1e-6)  # summed in f32
        np.testing.assert_allclose(evaluate(state, (x, y))["loss"], _loss(params, x, y), rtol=1e-13)
        assert np.asarray(history["train_nonfinite"]).tolist() == [0, 0, 0]


def test_float64_inputs_train_a_float32_batchnorm_model_as_float32_inputs_do():
    model = MLP(num_classes=3, features=(8,), norm="batch")
    with jax.enable_x64(True):
        x, y = _data()
        runs = []
        for inputs in (x, x.astype(np.float32)):
            state = create_train_state(model, optax.sgd(0.1), inputs, jax.random.key(0))
            state, _ = fit(
                state, (inputs, y), val_data=(inputs, y), batch_size=20, epochs=2, accumulate=2
            )
            runs.append(state)
    kept = [(s.params, s.batch_stats, s.opt_state) for s in runs]
    for got, want in zip(jax.tree.leaves(kept[0]), jax.tree.leaves(kept[1]), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
