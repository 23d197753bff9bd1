"""Per-class metrics of classification: balanced accuracy, macro-F1, the confusion matrix
and per-class recall / precision / F1 equal scikit-learn's on the same predictions, for
any evaluation batch size, for ensembles, and in a run's summary."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from jtricks.errors import ConfigError
from jtricks.training import class_report, create_train_state, evaluate
from jtricks.training.class_report import evaluate_with_report
from jtricks.training.ensemble import create_ensemble, predict_proba

C = 5


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(x)


@pytest.fixture(scope="module")
def case():
    """A random linear classifier and labels that never use class 4 (which it may
    predict): the absent-class rules of scikit-learn matter."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 3)).astype(np.float32)
    y = rng.integers(0, C - 1, 203).astype(np.int32)
    state = create_train_state(Linear(), optax.sgd(0.1), x[:2], jax.random.key(0))
    pred = np.argmax(np.asarray(Linear().apply({"params": state.params}, x)), axis=-1)
    assert (pred == C - 1).any() and not (y == C - 1).any()
    return state, x, y, pred


@pytest.mark.parametrize("batch_size", [50, 64, 1000])
def test_balanced_accuracy_and_macro_f1_equal_sklearn(case, batch_size):
    state, x, y, pred = case
    m = evaluate(state, (x, y), batch_size=batch_size)
    with pytest.warns(UserWarning, match="not in y_true"):
        balanced = balanced_accuracy_score(y, pred)
    assert m["balanced_accuracy"] == pytest.approx(balanced, abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y), abs=1e-6)


def test_class_report_equals_sklearn(case):
    state, x, y, pred = case
    report = class_report(state, (x, y), batch_size=40)
    np.testing.assert_array_equal(report.confusion, confusion_matrix(y, pred, labels=range(C)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(C), zero_division=0)
    np.testing.assert_allclose(report.precision, p)
    np.testing.assert_allclose(report.recall, r)
    np.testing.assert_allclose(report.f1, f)
    np.testing.assert_array_equal(report.support, s)
    assert report.to_dict()["support"] == s.tolist()


def test_ensemble_report_is_the_combined_prediction():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 3)).astype(np.float32)
    y = rng.integers(0, C, 90).astype(np.int32)
    states = create_ensemble(
        Linear(), optax.sgd(0.1), x[:2], jax.random.split(jax.random.key(3), 3)
    )
    test, report = evaluate_with_report(states, (x, y), None, 32, "auto")
    pred = np.argmax(np.asarray(predict_proba(states, x)), axis=-1)
    np.testing.assert_array_equal(report.confusion, confusion_matrix(y, pred, labels=range(C)))
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert len(test["member_macro_f1"]) == 3


def test_class_report_refuses_other_tasks(case):
    state, x, y, _ = case
    with pytest.raises(ConfigError, match="classification task; got the regression"):
        class_report(state, (x, y.astype(np.float32)[:, None].repeat(C, 1)), task="regression")


def test_run_summary_has_per_class_figures(tmp_path):
    from jtricks.cli import main

    out = tmp_path / "run"
    spec = "synthetic(num_train=150, num_test=80, shape=(6,), num_classes=4, noise=1.5)"
    argv = ["train", "--dataset", spec, "--model", "mlp(features=(8,))", "--epochs", "2"]
    assert main([*argv, "--batch-size", "25", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    per_class = summary["per_class"]
    cm = np.asarray(per_class["confusion"])
    assert cm.shape == (4, 4) and cm.sum() == 80 and (out / "confusion.png").is_file()
    np.testing.assert_allclose(per_class["recall"], np.diag(cm) / cm.sum(axis=1))
    assert summary["test_accuracy"] == pytest.approx(np.trace(cm) / 80, abs=1e-6)
    assert summary["test_balanced_accuracy"] == pytest.approx(
        np.mean(per_class["recall"]), abs=1e-6
    )
    assert "val_macro_f1" in summary
