"""A hyper-parameter sweep compiles once (`jtricks.optim.sweep`): optimizers that differ
only in an injected number are equal, `fit` reuses one epoch program for all of them, and
that program trains each rate exactly as a fresh ``optax`` optimizer of that rate does."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.optim import Keyed, build_optimizer, current_learning_rate, sweepable
from jtricks.training import create_train_state, fit

MODEL = build_model("mlp(features=(8,))", 3)
RATES = (1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 3, 40)


def test_optimizers_differing_only_in_the_rate_are_equal():
    adam = sweepable(optax.adam)
    a, b = adam(learning_rate=1e-3), adam(learning_rate=3e-3)
    assert a == b and hash(a) == hash(b) and isinstance(a, Keyed)
    assert adam(learning_rate=1e-3, b1=0.8) != a  # a non-injected argument is in the key
    schedule = optax.constant_schedule(1e-3)
    assert adam(learning_rate=schedule) == adam(learning_rate=schedule)
    assert adam(learning_rate=schedule) != adam(learning_rate=optax.constant_schedule(1e-3))
    assert sweepable(optax.sgd)(learning_rate=1e-3) != a  # another factory
    assert build_optimizer("adam", 1e-3) == build_optimizer("adam", 1e-2)
    assert build_optimizer("adam", 1e-3) != build_optimizer("adam | clip_global_norm(1.0)", 1e-3)
    assert build_optimizer("adam", 1e-3) != optax.adam(1e-3)


def test_an_unknown_hyperparameter_is_refused():
    with pytest.raises(ConfigError, match=r"hyperparams \['lr'\] are not parameters of adam"):
        sweepable(optax.adam, hyperparams=("lr",))
    with pytest.raises(
        ConfigError,
        match="adam: missing a required argument: 'learning_rate'; it takes: learning_rate, b1",
    ):
        sweepable(optax.adam)(lr=1e-3)


def _epoch_compiles(caplog) -> int:
    return sum("XLA compilation of jit(run_part)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "make",
    [lambda lr: build_optimizer("adam", lr), lambda lr: sweepable(optax.adam)(learning_rate=lr)],
    ids=["build_optimizer", "sweepable"],
)
def test_a_sweep_compiles_once_and_trains_each_rate_exactly(data, caplog, make):
    """Three rates, one XLA compilation of the epoch program; each rate's parameters equal
    those of a fresh `optax.adam` of that rate (its own compilation, a second code path)."""
    x, y = data
    got = []
    with caplog.at_level("WARNING"), jax.log_compiles(True):
        for lr in RATES:
            state = create_train_state(MODEL, make(lr), x, jax.random.key(0))
            state, hist = fit(state, (x, y), batch_size=10, epochs=2)
            assert hist.records[-1]["lr"] == pytest.approx(lr)
            assert float(current_learning_rate(state.opt_state)) == pytest.approx(lr)
            got.append(state.params)
        assert _epoch_compiles(caplog) == 1
    for lr, params in zip(RATES, got, strict=True):
        state = create_train_state(MODEL, optax.adam(lr), x, jax.random.key(0))
        want, _ = fit(state, (x, y), batch_size=10, epochs=2)
        jax.tree.map(np.testing.assert_array_equal, params, want.params)


def test_a_factory_sees_a_number_for_a_schedule(tmp_path):
    """A user's factory that computes with its rate (``optax.scale(-lr)``) is validated
    with the schedule's first value, and trains with the scheduled one."""
    schedule = optax.linear_schedule(1e-2, 0.0, 10)

    def make(learning_rate):
        return optax.chain(optax.scale_by_adam(), optax.scale(-learning_rate))

    tx = build_optimizer(make, schedule)
    params = {"w": np.ones(3, np.float32)}
    state = tx.init(params)
    updates, state = tx.update({"w": np.ones(3, np.float32)}, state, params)
    np.testing.assert_allclose(updates["w"], -1e-2, rtol=1e-5)  # Adam's first step is +-1


def test_jtricks_own_optimizers_hold_their_rate_in_the_state():
    """`current_learning_rate` reads a raw `jtricks.optim.momentum(0.1)`'s rate, and
    `set_learning_rate` changes the update to the one a fresh optimizer of that rate makes
    (momentum's first step: ``-lr g``, written out)."""
    from jtricks.optim import momentum, set_learning_rate

    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.full(3, 2.0, np.float32)}
    tx = momentum(0.1, 0.9)
    state = tx.init(params)
    assert float(current_learning_rate(state)) == pytest.approx(0.1)
    assert tx == momentum(0.3, 0.9) and tx != momentum(0.1, 0.5)
    updates, _ = tx.update(grads, set_learning_rate(state, 0.05), params)
    np.testing.assert_allclose(updates["w"], -0.05 * 2.0, rtol=1e-6)
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = momentum(schedule)
    state = tx.init(params)
    for _ in range(3):  # the schedule's value at the step just taken: 0.1, 0.09, 0.08
        _, state = tx.update(grads, state, params)
    assert float(current_learning_rate(state)) == pytest.approx(0.08)
