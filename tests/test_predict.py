"""`predict`: the model's evaluation-mode outputs in batches, equal to Flax's ``apply`` on
the whole set at once (BatchNorm's running statistics, no dropout), on the evaluation
parameters, for single and stacked states; inputs the model cannot take are one line."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jtricks import create_train_state, fit, predict
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.optim import build_optimizer
from jtricks.training.ensemble import create_ensemble, predict_proba

RNG = np.random.default_rng(0)
X = RNG.normal(size=(230, 6)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)
NET = build_model("mlp(features=(16,), norm='batch', dropout=0.3)", 3)


@pytest.fixture(scope="module")
def trained():
    state = create_train_state(NET, optax.adam(1e-2), X, jax.random.key(0))
    return fit(state, (X, Y), batch_size=32, epochs=2)[0]


def test_predict_equals_apply_on_the_whole_set_in_evaluation_mode(trained):
    variables = {"params": trained.params, "batch_stats": trained.batch_stats}
    whole = np.asarray(NET.apply(variables, X, train=False))
    got = predict(trained, X, batch_size=64)  # 4 batches, the last padded
    assert isinstance(got, np.ndarray) and got.shape == (230, 3)
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(trained, X, batch_size=64), got)  # no dropout
    with pytest.raises(ConfigError, match=r"predict inputs.*shape"):
        predict(trained, X[:, :4])
    with pytest.raises(ConfigError, match=r"predict takes what the model reads, x, not a batch"):
        predict(trained, (X, Y))
    with pytest.raises(ConfigError, match=r"one example\? give it a leading axis: x\[None\]"):
        predict(trained, X[0])
    assert predict(trained, X[0][None]).shape == (1, 3)
    with pytest.raises(ConfigError, match="batch_size"):
        predict(trained, X, batch_size=0)
    with pytest.raises(ConfigError, match=r"a list of examples .* np\.asarray"):
        predict(trained, X[:5].tolist())


def test_predict_reads_the_evaluation_parameters_of_schedule_free():
    tx = build_optimizer("contrib.schedule_free_adamw", 1e-2)
    state = create_train_state(build_model("mlp(features=(8,))", 3), tx, X, jax.random.key(1))
    state, _ = fit(state, (X, Y), batch_size=32, epochs=2)
    is_sf = lambda s: isinstance(s, optax.contrib.ScheduleFreeState)  # noqa: E731
    (sf,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_sf) if is_sf(s)]
    x_params = optax.contrib.schedule_free_eval_params(sf, state.params)
    by_hand = state.apply_fn({"params": x_params}, X, train=False)
    np.testing.assert_allclose(predict(state, X), by_hand, rtol=1e-5, atol=1e-6)
    trained = state.apply_fn({"params": state.params}, X, train=False)
    np.testing.assert_allclose(predict(state, X, params="train"), trained, rtol=1e-5, atol=1e-6)
    assert not np.allclose(by_hand, trained)


def test_predict_on_an_ensemble_gives_every_member():
    keys = jax.random.split(jax.random.key(2), 3)
    members = create_ensemble(NET, optax.adam(1e-2), X, keys)
    members, _ = fit(members, (X, Y), batch_size=32, epochs=1)
    got = predict(members, X, batch_size=100)
    assert got.shape == (3, 230, 3)
    for i in range(3):
        member = jax.tree.map(lambda a, i=i: a[i], members)
        np.testing.assert_allclose(got[i], predict(member, X), rtol=1e-5, atol=1e-6)
    mean = np.asarray(jax.nn.softmax(got)).mean(axis=0)
    np.testing.assert_allclose(mean, predict_proba(members, X), rtol=1e-5, atol=1e-6)


def test_predict_on_an_nnx_model_equals_the_module_in_evaluation_mode():
    from flax import nnx

    from jtricks.training import nnx_module

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense, self.norm = nnx.Linear(6, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.drop, self.head = nnx.Dropout(0.3, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(jax.nn.relu(self.norm(self.dense(x)))))

    state = create_train_state(Net(nnx.Rngs(0)), optax.adam(1e-2), X, jax.random.key(0))
    state, _ = fit(state, (X, Y), batch_size=32, epochs=1)
    module = nnx_module(state)
    module.eval()
    np.testing.assert_allclose(predict(state, X, batch_size=100), module(X), rtol=1e-5, atol=1e-6)
