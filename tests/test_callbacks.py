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


class _Edit:
    """Halves the parameters after epoch ``at`` (a new state to go on from) and stops after
    epoch ``stop``; notes each epoch's step and how many epoch programs `fit` had
    dispatched when it was called (``dispatched``, counted by the test)."""

    def __init__(self, at, stop, dispatched):
        self.at, self.stop, self.dispatched, self.seen, self.states = at, stop, dispatched, [], []

    def on_epoch_end(self, record, state):
        self.seen.append((record["epoch"], int(state.step), self.dispatched[0]))
        self.states.append(state)
        if record["epoch"] == self.stop:
            return True
        if record["epoch"] == self.at:
            return state.replace(params=jax.tree.map(lambda p: p * 0.5, state.params))
        return None


class _EditCopy(_Edit):
    takes_copy = True


def test_callbacks_taking_a_copy_run_one_epoch_behind_with_the_same_results(
    tiny_data, adam, key, monkeypatch
):
    """A ``takes_copy`` callback is called once the next epoch is in flight; the epoch in
    flight when it returns a state or stops is discarded, so the run ends exactly as with
    a callback that gets the live state before each dispatch."""
    from jtricks.training import loop

    d, dispatched, original = tiny_data, [0], loop.run_epoch

    def counting(*args, **kwargs):
        dispatched[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", counting)
    runs = {}
    for cls in (_Edit, _EditCopy):
        dispatched[0] = 0
        cb = cls(at=2, stop=4, dispatched=dispatched)
        state, hist = fit(
            create_train_state(MODEL, adam, d.x_train, key),
            (d.x_train, d.y_train),
            val_data=(d.x_test, d.y_test),
            batch_size=20,
            epochs=6,
            callbacks=[cb],
        )
        runs[cls] = (state, hist, cb.seen, dispatched[0], cb.states)
    live, ahead = runs[_Edit], runs[_EditCopy]
    assert _same(live[0].params, ahead[0].params)
    assert int(live[0].step) == int(ahead[0].step) == 40  # stopped after epoch 4
    assert [r["val_loss"] for r in live[1]] == [r["val_loss"] for r in ahead[1]]
    assert (
        [s[:2] for s in live[2]] == [s[:2] for s in ahead[2]] == [(e, 10 * e) for e in (1, 2, 3, 4)]
    )
    assert [s[2] for s in live[2]] == [1, 2, 3, 4] and live[3] == 4  # before each dispatch
    # ahead by one; epoch 3 run again after epoch 2's new state, epoch 5 dropped at the stop
    assert [s[2] for s in ahead[2]] == [2, 3, 5, 6] and ahead[3] == 6
    # fit never donates the copies it hands out (the state kept for divergence is one of
    # them): epoch 2's new state shares its optimizer state with its copy, and fit
    # copies it before going on
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(ahead[4]))


def test_observers_get_no_state_beside_a_copy_taker(tiny_data, adam, key):
    d = tiny_data

    class Observe:
        needs_state = False

        def __init__(self):
            self.states = []

        def on_epoch_end(self, record, state):
            self.states.append(state)

    observe, early = Observe(), EarlyStopping(patience=5)
    fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        val_data=(d.x_test, d.y_test),
        batch_size=20,
        epochs=3,
        callbacks=[observe, early],
    )
    assert observe.states == [None, None, None] and early.best_epoch is not None


@pytest.mark.parametrize(
    "flags", [["--early-stopping", "2", "--schedule", "plateau"], ["--swa", "2"]]
)
def test_the_cli_run_dispatches_each_epoch_before_its_callbacks(tmp_path, monkeypatch, flags):
    """Every callback a `jtricks train` run attaches (checkpoints, early stopping, the
    plateau schedule, SWA, the metrics files) lets the loop run ahead."""
    from jtricks.cli import main
    from jtricks.training import loop

    seen, original = [], loop.Ahead.of

    def of(run, callbacks):
        seen.append(original(run, callbacks))
        return seen[-1]

    monkeypatch.setattr(loop.Ahead, "of", of)
    args = ["train", "--dataset", "synthetic(num_train=120, num_test=40, shape=(6,))"]
    args += ["--model", "mlp(features=(8,))", "--epochs", "3", "--no-progress"]
    assert main([*args, *flags, "--out", str(tmp_path / "run")]) == 0
    assert seen and all(a.dispatch and a.copies for a in seen)
