"""Training core: TrainState, pure steps, fit, determinism, resume, and a hand-written reference loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.data import epoch_indices
from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.training import create_train_state, evaluate, fit, make_train_step
from jtricks.training.compiled import part_program

MODEL = MLP(num_classes=4, features=(16,))


@pytest.fixture
def state(tiny_data, adam, key):
    return create_train_state(MODEL, adam, tiny_data.x_train, key)


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_tiny_run_learns(state, tiny_data):
    d = tiny_data
    state, hist = fit(
        state, (d.x_train, d.y_train), val_data=(d.x_test, d.y_test), batch_size=20, epochs=5
    )
    assert len(hist) == 5 and hist["step"][-1] == 50
    assert hist["val_accuracy"][-1] > 0.9  # chance is 0.25
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert int(state.step) == 50
    test = evaluate(state, (d.x_test, d.y_test))
    np.testing.assert_allclose(test["accuracy"], hist["val_accuracy"][-1])


def test_same_seed_gives_identical_metrics(tiny_data, adam):
    d = tiny_data
    runs = []
    for _ in range(2):
        s = create_train_state(MODEL, adam, d.x_train, jax.random.key(3))
        s, h = fit(
            s, (d.x_train, d.y_train), val_data=(d.x_test, d.y_test), batch_size=20, epochs=2
        )
        runs.append((s, h))
    (s1, h1), (s2, h2) = runs
    assert _leaves_equal(s1.params, s2.params)
    for r1, r2 in zip(h1, h2, strict=True):
        for k in r1:
            if k not in ("steps_per_s", "elapsed_s"):
                assert r1[k] == r2[k], k
    s3 = create_train_state(MODEL, adam, d.x_train, jax.random.key(4))
    s3, _ = fit(s3, (d.x_train, d.y_train), batch_size=20, epochs=2)
    assert not _leaves_equal(s1.params, s3.params)


def test_fit_matches_hand_written_loop(tiny_data, adam, key):
    """Second code path: a Python loop over the pure train step with the same batches."""
    d = tiny_data
    s0 = create_train_state(MODEL, adam, d.x_train, key)
    data_key = jax.random.key(9)
    fitted, _ = fit(s0, (d.x_train, d.y_train), batch_size=32, epochs=2, data_key=data_key)

    s = create_train_state(MODEL, adam, d.x_train, key)
    step = jax.jit(make_train_step())
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    for epoch in range(2):
        idx = epoch_indices(jax.random.fold_in(data_key, epoch), 200, 32, 200 // 32)
        for i in idx:
            s, _ = step(s, (x[i], y[i]))
    assert int(s.step) == int(fitted.step) == 12
    for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(fitted.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_split_fit_calls_equal_one_call(tiny_data, adam, key):
    """Stopping mid-epoch and calling fit again continues the same data order."""
    d = tiny_data
    whole, _ = fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        batch_size=20,
        steps=25,
    )
    part = create_train_state(MODEL, adam, d.x_train, key)
    part, h1 = fit(part, (d.x_train, d.y_train), batch_size=20, steps=13)
    part, h2 = fit(part, (d.x_train, d.y_train), batch_size=20, steps=12)
    assert [r["step"] for r in h1] == [10, 13] and [r["step"] for r in h2] == [20, 25]
    assert _leaves_equal(whole.params, part.params)
    assert _leaves_equal(whole.opt_state, part.opt_state)


def test_dropout_keys_follow_the_step(tiny_data, adam, key):
    model = MLP(num_classes=4, features=(16,), dropout=0.5)
    s = create_train_state(model, adam, tiny_data.x_train, key)
    step = jax.jit(make_train_step())
    batch = (jnp.asarray(tiny_data.x_train[:8]), jnp.asarray(tiny_data.y_train[:8]))
    a, _ = step(s, batch)
    b, _ = step(s, batch)
    assert _leaves_equal(a.params, b.params)  # same state, same step -> same mask
    c, _ = step(s.replace(step=s.step + 1), batch)
    assert not _leaves_equal(a.params, c.params)


def test_step_metrics_match_formulas(state, tiny_data):
    x, y = jnp.asarray(tiny_data.x_train[:10]), jnp.asarray(tiny_data.y_train[:10])
    new, m = jax.jit(make_train_step(update_norm=True))(state, (x, y))
    logits = MODEL.apply({"params": state.params}, x)
    logp = jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits)
    np.testing.assert_allclose(
        m["loss"],
        -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(y)[:, None], 1)),
        rtol=1e-5,
    )
    grads = jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(
            MODEL.apply({"params": p}, x), y
        ).mean()
    )(state.params)
    np.testing.assert_allclose(
        m["grad_norm"],
        np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads))),
        rtol=1e-5,
    )
    delta = jax.tree.map(lambda a, b: a - b, new.params, state.params)
    np.testing.assert_allclose(m["update_norm"], optax.tree.norm(delta), rtol=1e-4)


def test_evaluate_does_not_depend_on_batch_size(state, tiny_data):
    d = tiny_data
    a = evaluate(state, (d.x_test, d.y_test), batch_size=100)
    b = evaluate(state, (d.x_test, d.y_test), batch_size=7)  # padded last batch
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["accuracy"] == b["accuracy"]
    logits = MODEL.apply({"params": state.params}, d.x_test)
    np.testing.assert_allclose(a["accuracy"], np.mean(np.argmax(logits, -1) == d.y_test))
    c = evaluate(state, (d.x_test, d.y_test), eval_batch_size=7)  # fit's name for it
    assert c == b
    with pytest.raises(ConfigError, match="give batch_size or eval_batch_size"):
        evaluate(state, (d.x_test, d.y_test), batch_size=100, eval_batch_size=7)


def test_second_fit_does_not_recompile(tiny_data, adam, key):
    d = tiny_data
    run_epoch = part_program()
    fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        batch_size=40,
        epochs=1,
    )
    size = run_epoch._cache_size()
    fit(
        create_train_state(MODEL, adam, d.x_train, jax.random.key(5)),
        (d.x_train, d.y_train),
        batch_size=40,
        epochs=2,
    )
    assert run_epoch._cache_size() == size


def test_callback_can_stop(state, tiny_data):
    class StopAfterTwo:
        def on_epoch_end(self, record, state):
            return record["epoch"] >= 2

    _, hist = fit(
        state,
        (tiny_data.x_train, tiny_data.y_train),
        batch_size=50,
        epochs=10,
        callbacks=[StopAfterTwo()],
    )
    assert len(hist) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0, "epochs": 1}, "batch_size"),
        ({"batch_size": 201, "epochs": 1}, "batch_size"),
        ({"batch_size": 10, "epochs": 0}, "epochs"),
        ({"batch_size": 10, "steps": 0}, "steps"),
        ({"batch_size": 10}, "exactly one of epochs and steps"),
        ({"batch_size": 10, "epochs": 1, "steps": 3}, "exactly one of epochs and steps"),
    ],
)
def test_fit_rejects_bad_numbers(state, tiny_data, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fit(state, (tiny_data.x_train, tiny_data.y_train), **kwargs)


def test_fit_rejects_nan_and_bad_labels_before_training(state, tiny_data):
    x = tiny_data.x_train.copy()
    x[3, 2] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        fit(state, (x, tiny_data.y_train), batch_size=10, epochs=1)
    y = tiny_data.y_train.copy()
    y[0] = 4  # the model has 4 outputs: labels must be < 4
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 3\]"):
        fit(state, (tiny_data.x_train, y), batch_size=10, epochs=1)
    with pytest.raises(ConfigError, match="validation examples have shape"):
        fit(
            state,
            (tiny_data.x_train, tiny_data.y_train),
            val_data=(np.zeros((3, 5)), np.zeros(3, np.int32)),
            batch_size=10,
            epochs=1,
        )
    assert int(state.step) == 0


def test_pipelined_epochs_match_synchronous_ones(tiny_data, adam, key):
    """Observing callbacks let fit dispatch ahead; the results must not change."""
    d = tiny_data

    class Observe:
        needs_state = False

        def __init__(self):
            self.seen = []

        def on_epoch_end(self, record, state):
            assert state is None
            self.seen.append(record["epoch"])

    class Active:
        def on_epoch_end(self, record, state):
            assert state is not None
            return None

    obs = Observe()
    a, ha = fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        val_data=(d.x_test, d.y_test),
        batch_size=20,
        steps=37,
        callbacks=[obs],
    )
    b, hb = fit(
        create_train_state(MODEL, adam, d.x_train, key),
        (d.x_train, d.y_train),
        val_data=(d.x_test, d.y_test),
        batch_size=20,
        steps=37,
        callbacks=[Active()],
    )
    assert obs.seen == [1, 2, 3, 4]
    assert _leaves_equal(a.params, b.params)
    assert [r["val_loss"] for r in ha] == [r["val_loss"] for r in hb]


def test_device_data_train_alike_and_are_never_copied_to_the_host(
    tiny_data, adam, key, monkeypatch
):
    """Training and validation data already on the device are checked there: no host copy
    of them (np.asarray of a JAX array) during `fit` or `evaluate`, and the same result
    as the same data given as NumPy arrays."""
    d = tiny_data
    host = dict(batch_size=20, epochs=2, val_data=(d.x_test, d.y_test))
    ref, ref_hist = fit(
        create_train_state(MODEL, adam, d.x_train, key), (d.x_train, d.y_train), **host
    )
    x, y, xv, yv = (jnp.asarray(a) for a in (d.x_train, d.y_train, d.x_test, d.y_test))
    copied = []
    cls = type(x)
    original = cls.__array__

    def spy(self, *args, **kwargs):
        copied.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__array__", spy)
    state = create_train_state(MODEL, adam, d.x_train, key)
    got, hist = fit(state, (x, y), batch_size=20, epochs=2, val_data=(xv, yv))
    test = evaluate(got, (xv, yv), batch_size=30)
    big = [s for s in copied if s and s[0] in (len(d.x_train), len(d.x_test))]
    assert not big, f"device data copied to the host: {big}"
    monkeypatch.undo()
    assert _leaves_equal(got.params, ref.params)
    np.testing.assert_array_equal(hist["val_loss"], ref_hist["val_loss"])
    assert test["loss"] == pytest.approx(evaluate(ref, (d.x_test, d.y_test))["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("x", r"features contain 2 non-finite values \(NaN or inf\), first at index \(3, 1\)"),
        (
            "y",
            r"labels must lie in \[0, 3\] because the model has 4 outputs; got values in \[0, 7\]",
        ),
    ],
)
def test_device_data_get_the_same_errors(tiny_data, adam, key, where, message):
    d = tiny_data
    x, y = d.x_train.copy(), d.y_train.copy()
    if where == "x":
        x[3, 1] = np.nan
        x[5, 0] = np.inf
    else:
        y[4] = 7
    state = create_train_state(MODEL, adam, d.x_train, key)
    for data in ((x, y), (jnp.asarray(x), jnp.asarray(y))):
        with pytest.raises(ConfigError, match=message):
            fit(state, data, batch_size=20, epochs=1)


def test_a_state_fit_consumed_is_refused_and_a_copy_stays_usable(tiny_data, adam, key):
    from jtricks.training.state import device_copy

    d = tiny_data
    state = create_train_state(MODEL, adam, d.x_train, key)
    kept = device_copy(state)
    trained, _ = fit(state, (d.x_train, d.y_train), batch_size=20, epochs=1)
    for again in (
        lambda: fit(state, (d.x_train, d.y_train), batch_size=20, epochs=1),
        lambda: evaluate(state, (d.x_test, d.y_test)),
    ):
        with pytest.raises(ConfigError, match=r"consumed by an earlier fit.*device_copy"):
            again()
    before = evaluate(kept, (d.x_test, d.y_test))  # the copy is the untrained model
    logits = MODEL.apply({"params": kept.params}, d.x_test)
    np.testing.assert_allclose(before["accuracy"], np.mean(np.argmax(logits, -1) == d.y_test))
    assert int(trained.step) == 10 and int(kept.step) == 0


def test_a_missing_history_key_lists_the_keys_there_are(state, tiny_data):
    _, hist = fit(state, (tiny_data.x_train, tiny_data.y_train), batch_size=50, epochs=2)
    with pytest.raises(
        KeyError, match=r"no 'train_label_accuracy'; its keys are: .*train_accuracy"
    ):
        hist["train_label_accuracy"]
    with pytest.raises(
        KeyError, match=r"'initial_loss' is missing from the records of epochs \[2\]"
    ):
        hist["initial_loss"]
    assert hist["train_loss"].shape == (2,)
    assert "train_loss" in hist and "val_loss" not in hist and "initial_loss" not in hist
    assert hist[0] in hist
    assert hist.keys() == list(hist[0]) and "initial_loss" in hist.keys()
