"""Test-time augmentation: the mean softmax over views against a float64 numpy reference,
one view equals plain evaluation, batch-size independence, config errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtricks
from jtricks.cli import main
from jtricks.data import augment as A
from jtricks.errors import ConfigError
from jtricks.nn import CNN1D
from jtricks.training import create_train_state, evaluate, fit
from jtricks.training.tta import evaluate_tta, tta_log_probs

MODEL = CNN1D(num_classes=4, channels=(4, 4, 4), norm="batch")


@pytest.fixture(scope="module")
def trained(tiny_data, adam):
    state = create_train_state(MODEL, adam, tiny_data.x_train, jax.random.key(0))
    state, _ = fit(state, (tiny_data.x_train, tiny_data.y_train), batch_size=50, epochs=2)
    return state


AUG = A.compose([A.shift(2), A.scale(0.3)])


def _reference(state, x, y, views, key):
    """Float64 numpy: per example i and view v >= 1, augment with fold_in(fold_in(key, v), i)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def probs(xs):
        z = np.asarray(state.apply_fn(variables, np.stack(xs), train=False), np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p = probs(list(x))
    for v in range(1, views):
        kv = jax.random.fold_in(key, v)
        p += probs([AUG(jax.random.fold_in(kv, i), xi) for i, xi in enumerate(x)])
    p /= views
    return -np.log(p[np.arange(len(y)), y]).mean(), (p.argmax(1) == y).mean(), np.log(p)


def test_tta_matches_numpy_reference_and_is_batch_size_independent(trained, tiny_data):
    x, y = tiny_data.x_test[:37], tiny_data.y_test[:37]
    key = jax.random.key(5)
    loss, acc, logp = _reference(trained, x, y, 4, key)
    for batch_size in (1000, 8):
        got = evaluate_tta(trained, (x, y), AUG, views=4, key=key, batch_size=batch_size)
        np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], acc)
    np.testing.assert_allclose(
        tta_log_probs(trained, x, AUG, views=4, key=key, batch_size=10), logp, atol=1e-5
    )
    other = evaluate_tta(trained, (x, y), AUG, views=4, key=jax.random.key(6))
    assert other["loss"] != got["loss"]  # the views depend on the key


def test_an_ensembles_tta_averages_each_members_views_then_the_members(trained, tiny_data):
    """Stacked states (``--ensemble``): each member's TTA prediction (its mean softmax over
    the views), then the ensemble's mean of the members' probabilities; every member's
    metrics beside it. Against the float64 reference of each member."""
    x, y = tiny_data.x_test[:21], tiny_data.y_test[:21]
    key = jax.random.key(5)
    other = trained.replace(params=jax.tree.map(lambda p: 0.7 * p, trained.params))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), trained, other)
    refs = [_reference(s, x, y, 3, key) for s in (trained, other)]
    p = np.mean([np.exp(r[2]) for r in refs], axis=0)
    got = evaluate_tta(stacked, (x, y), AUG, views=3, key=key, batch_size=8)
    np.testing.assert_allclose(got["loss"], -np.log(p[np.arange(len(y)), y]).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], (p.argmax(1) == y).mean())
    np.testing.assert_allclose(got["member_loss"], [r[0] for r in refs], rtol=1e-5)
    np.testing.assert_allclose(got["member_accuracy"], [r[1] for r in refs])


def test_one_view_is_plain_evaluation(trained, tiny_data):
    data = (tiny_data.x_test, tiny_data.y_test)
    plain = evaluate(trained, data)
    one = evaluate_tta(trained, data, AUG, views=1, key=jax.random.key(0))
    np.testing.assert_allclose(one["loss"], plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(one["accuracy"], plain["accuracy"])


SPEC = "synthetic(num_train=120, num_test=60, shape=(16,), num_classes=3, noise=0.3)"


def test_train_reports_tta_and_single_view(tmp_path):
    import json

    out = tmp_path / "run"
    args = ["--dataset", SPEC, "--model", "mlp(features=(8,))", "--epochs", "2"]
    assert main(["train", *args, "--augment", "shift(2)", "--tta", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta_views"] == 5 and 0 <= summary["val_tta_accuracy"] <= 1
    plain = jtricks.train(dataset=SPEC, model="mlp(features=(8,))", epochs=2, augment="shift(2)")
    np.testing.assert_allclose(summary["test_single_view_accuracy"], plain.test["accuracy"])
    # the folder's model predicts as the summary tested: its views (a second path), one view
    run, data = jtricks.load_run(out), jtricks.load_dataset(SPEC)
    logp, y = run.predict_tta(data.x_test), data.y_test
    assert (logp.argmax(-1) == y).mean() == pytest.approx(summary["test_accuracy"], abs=1e-7)
    nll = -logp[np.arange(len(y)), y].mean()
    assert nll == pytest.approx(summary["test_loss"], rel=1e-6)  # another key: 5e-6 off
    single = (run.predict(data.x_test).argmax(-1) == y).mean()
    assert single == pytest.approx(summary["test_single_view_accuracy"], abs=1e-7)
    with pytest.raises(ConfigError, match="predict_tta needs a run with --tta > 1"):
        dataclasses.replace(run, tta=None).predict_tta(data.x_test)


def test_a_regression_runs_views_predict_as_its_summary_scored(tmp_path):
    """A regression run with ``--tta 3``: `predict_tta` is the mean output over the run's
    views (it was refused for any task but classification), from which the summary's test
    mse follows; the single view's is `predict`'s."""
    import json

    spec = "regression(num_train=120, num_test=40)"
    out = tmp_path / "run"
    args = ["--dataset", spec, "--model", "mlp(features=(8,))", "--epochs", "2"]
    assert main(["train", *args, "--augment", "noise(0.3)", "--tta", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    run, data = jtricks.load_run(out), jtricks.load_dataset(spec)
    y = data.y_test.reshape(len(data.y_test), -1).astype(np.float64)
    views = run.predict_tta(data.x_test).reshape(len(y), -1)
    assert np.mean((views - y) ** 2) == pytest.approx(summary["test_mse"], rel=1e-5)
    single = run.predict(data.x_test).reshape(len(y), -1)
    assert np.mean((single - y) ** 2) == pytest.approx(summary["test_single_view_mse"], rel=1e-5)
    assert summary["test_mse"] != summary["test_single_view_mse"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tta": 0}, "tta"),
        ({"tta": 3}, "give augment"),
        ({"tta_augment": "noise(0.1)"}, "needs tta > 1"),
    ],
)
def test_bad_tta_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        jtricks.TrainConfig(**kwargs).validate()


def test_cli_bad_tta_augment_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset", SPEC, "--model", "mlp(features=(8,))", "--epochs", "1", "--tta", "3"]
    code = main(["train", *args, "--tta-augment", "hflip", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--tta-augment" in err and "Traceback" not in err
    assert not out.exists()
