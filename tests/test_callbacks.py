"""Callbacks: early stopping on a scripted metric, the non-finite guard (T08)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.training import EarlyStopping, create_train_state, fit

MODEL = MLP(num_classes=4, features=(16,))


class Script:
    """Writes a scripted value into each epoch's record (callbacks share the record)."""

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, record, state):
        record["scripted"] = self.values[record["epoch"] - 1]


def _same(a, b):
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_early_stopping_stops_at_the_right_epoch_and_restores_best(tiny_data, adam, key):
    d = tiny_data
    values = [1.0, 0.8, 0.79, 0.85, 0.9, 0.6, 0.5]  # min_delta 0.05: epoch 3 is no improvement
    es = EarlyStopping(patience=3, min_delta=0.05, monitor="scripted")
    state, hist = fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        batch_size=20,
        epochs=7,
        callbacks=[Script(values), es],
    )
    assert len(hist) == 5 and es.stopped_epoch == 5 and es.best_epoch == 2 and es.best == 0.8
    assert hist.stopped == (
        "scripted did not improve for 3 epochs; kept epoch 2's state (scripted 0.8)"
    )
    best, _ = fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        batch_size=20,
        epochs=2,
    )
    assert _same(state.params, best.params)  # the restored state is epoch 2's, bit for bit
    assert int(state.step) == 20


def test_early_stopping_max_mode_and_restore_at_end(tiny_data, adam, key):
    d = tiny_data
    es = EarlyStopping(patience=5, monitor="scripted", mode="max")
    state, hist = fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        batch_size=20,
        epochs=3,
        callbacks=[Script([0.1, 0.9, 0.5]), es],
    )
    assert len(hist) == 3 and es.stopped_epoch is None and es.best_epoch == 2
    assert int(state.step) == 20  # restored to the best epoch when training ended


def test_member_early_stopping_is_each_members_own_early_stopping():
    """Per member: the epochs `EarlyStopping` would keep and stop at on that member's values
    alone (a later improvement of a stopped member does not count), the state of each
    member's kept epoch, and the stop when the last member stops."""
    from jtricks.training.callbacks import MemberEarlyStopping, StopTraining

    curves = np.array(
        [
            [1.0, 0.9, 0.95, 0.97, 0.5, 0.4],
            [1.0, 0.8, 0.7, 0.75, 0.6, 0.9],
            [np.nan, 1.0, 0.9, 0.8, 0.7, 0.6],
        ]
    )
    members = MemberEarlyStopping(patience=2)
    state = None
    for epoch in range(1, 7):
        state = {"w": jnp.full((3, 2), float(epoch))}  # each member's state names its epoch
        out = members.on_epoch_end(
            {"epoch": epoch, "val_member_loss": list(curves[:, epoch - 1])}, state
        )
        if out is not None:
            break
    for i, curve in enumerate(curves):
        own = EarlyStopping(patience=2)
        for epoch, value in enumerate(curve, 1):
            if own.on_epoch_end({"epoch": epoch, "val_loss": value}, state) is not None:
                break
        assert (members.best_epoch[i], members.stopped_epoch[i]) == (
            own.best_epoch,
            own.stopped_epoch,
        )
    assert members.best_epoch == [2, 5, 6] and members.stopped_epoch == [4, None, None]
    np.testing.assert_array_equal(members.on_train_end(state)["w"][:, 0], [2.0, 5.0, 6.0])
    stopping, two = MemberEarlyStopping(patience=1), {"w": jnp.zeros((2, 1))}
    stops = [
        stopping.on_epoch_end({"epoch": e, "val_member_loss": [1.0, 1.0]}, two) for e in (1, 2)
    ]
    assert stops[0] is None and isinstance(stops[1], StopTraining)


def test_early_stopping_errors():
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(ConfigError, match="mode"):
        EarlyStopping(mode="best")
    with pytest.raises(ConfigError, match="monitors 'val_loss'"):
        EarlyStopping().on_epoch_end({"epoch": 1, "train_loss": 1.0}, None)
    assert (
        EarlyStopping().on_epoch_end({"epoch": 1, "val_loss": float("nan")}, None) is None
    )  # nan never improves


def test_nonfinite_steps_are_skipped_and_counted(tiny_data, adam, key):
    d = tiny_data
    x = d.x_train.copy()
    state0 = create_train_state(MODEL, adam, x, key)

    def loss_fn(logits, labels):  # a loss that is NaN whenever the batch holds example 0's label 3
        from jtricks.losses import cross_entropy

        return cross_entropy(logits, labels) * jnp.where(labels == 3, jnp.nan, 1.0)

    state, hist = fit(
        state0, (x, d.y_train), batch_size=20, epochs=2, loss_fn=loss_fn, max_nonfinite=1000
    )
    assert sum(r["train_nonfinite"] for r in hist) > 0
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params))
    assert hist.stopped is None


def test_nonfinite_streak_stops_and_keeps_last_good_state(tiny_data, adam, key):
    d = tiny_data
    state0 = create_train_state(MODEL, adam, d.x_train, key)
    params0 = jax.tree.map(jnp.copy, state0.params)  # fit donates the state it is given

    def always_nan(logits, labels):
        return jnp.full(labels.shape, jnp.nan)

    state, hist = fit(
        state0,
        (d.x_train, d.y_train),
        batch_size=20,
        epochs=5,
        loss_fn=always_nan,
        max_nonfinite=15,
    )
    assert "consecutive steps had a non-finite loss or gradient" in hist.stopped
    assert len(hist) == 2  # 10 steps per epoch: the streak reaches 15 in epoch 2
    assert _same(state.params, params0)  # nothing was ever applied
