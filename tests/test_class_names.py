"""Class names: text labels in arrays, ``npz`` files and tables are numbered in sorted
order, a run keeps the names (`Dataset.classes` -> ``RunResult``, ``LoadedRun``,
``summary.json``), and its predictions name their classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jtricks
from jtricks.data import in_memory, load_dataset
from jtricks.errors import ConfigError

RUN = dict(model="mlp(features=(8,))", epochs=3, batch_size=20)
NAMES = np.array(["owl", "cat", "eel"])


@pytest.fixture(scope="module")
def named():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 5)).astype(np.float32)
    y = NAMES[(x[:, 0] > 0.4).astype(int) + (x[:, 1] > 0.6)]
    return x[:200], y[:200], x[200:], y[200:]


def test_text_labels_train_as_their_sorted_indices_and_the_run_names_them(named, tmp_path):
    x, y, x_test, y_test = named
    names, codes = np.unique(np.concatenate([y, y_test]), return_inverse=True)  # by hand
    by_index = jtricks.train(dataset=(x, codes[:200], x_test, codes[200:]), **RUN)
    by_name = jtricks.train(dataset=(x, y, x_test, y_test), out=tmp_path / "run", **RUN)
    assert by_name.test == by_index.test and by_index.classes is None
    assert by_name.classes == tuple(names) == ("cat", "eel", "owl")
    said = np.asarray(by_name.classes)[by_name.predict(x_test).argmax(-1)]
    assert (said == y_test).mean() == pytest.approx(by_name.test["accuracy"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["per_class"]["classes"] == ["cat", "eel", "owl"]
    assert jtricks.load_run(tmp_path / "run").classes == by_name.classes  # from config.json


def test_an_npz_file_of_text_labels_reads_as_the_arrays_do(named, tmp_path):
    x, y, x_test, y_test = named
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    held = load_dataset(in_memory((x, y, x_test, y_test)))
    assert data.classes == held.classes == ("cat", "eel", "owl")
    np.testing.assert_array_equal(data.y_train, np.searchsorted(data.classes, y))
    np.testing.assert_array_equal(data.y_test, held.y_test)


def test_a_test_name_the_training_labels_lack_is_refused(named):
    x, y, x_test, y_test = named
    y_test = np.where(y_test == "owl", "yak", y_test)
    with pytest.raises(ConfigError, match=r"y_test holds class name\(s\) \['yak'\] that y lacks"):
        in_memory((x, y, x_test, y_test))


def test_names_go_with_classification_only(named):
    x, y, x_test, y_test = named
    data = load_dataset(in_memory((x, y, x_test, y_test)))
    from jtricks.data.datasets import for_task

    assert for_task(data, "regression").classes is None
    with pytest.raises(ConfigError, match="2 class names for 3 classes"):
        jtricks.data.Dataset(
            "d", x, np.zeros(200, np.int32), x_test, np.zeros(40, np.int32), 3, classes=("a", "b")
        )
