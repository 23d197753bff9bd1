"""CSV tables as datasets (`jtricks.data.tables`): cells parsed against NumPy's own reader,
class names numbered in sorted order, the test split a second file or a stratified share
of the rows, and every malformed table refused naming its file, line and column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jtricks.cli import main
from jtricks.data import load_dataset, train_val_split
from jtricks.errors import ConfigError

RNG = np.random.default_rng(3)
X = RNG.normal(size=(90, 3)).round(4)
NAMES = np.array(["owl", "cat", "eel"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 0.4)]


def _write(path, header, columns, delimiter=","):
    lines = [delimiter.join(header)]
    lines += [delimiter.join(str(v) for v in row) for row in zip(*columns, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_table_of_class_names_splits_by_class_and_matches_numpys_reader(tmp_path):
    """Features against `numpy.loadtxt` of the same file; class names numbered in sorted
    order (cat 0, eel 1, owl 2); the test share drawn as `train_val_split` draws it with
    the same seed, per class; the same table with semicolons or tabs reads the same."""
    path = _write(tmp_path / "t.csv", ["a", "b", "c", "kind"], [*X.T, NAMES])
    data = load_dataset(f"csv(path='{path}', test_fraction=0.25, seed=4)")
    features = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1, 2), dtype=np.float32)
    labels = np.searchsorted(["cat", "eel", "owl"], NAMES)
    want = train_val_split(features, labels, 0.25, seed=4, stratify=True)
    got = (data.x_train, data.y_train, data.x_test, data.y_test)
    for a, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, expected)
    assert data.task == "classification" and data.num_classes == 3
    assert data.classes == ("cat", "eel", "owl")
    for delimiter, name in ((";", "s.csv"), ("\t", "t.tsv")):
        other = _write(tmp_path / name, ["a", "b", "c", "kind"], [*X.T, NAMES], delimiter)
        again = load_dataset(f"csv(path='{other}', test_fraction=0.25, seed=4)")
        np.testing.assert_array_equal(again.x_train, data.x_train)
        np.testing.assert_array_equal(again.y_test, data.y_test)


def test_a_test_file_matches_columns_by_name_and_targets_give_the_task(tmp_path):
    """A test file with its columns in another order; whole-number targets are labels,
    decimals regression targets (float32), the target column named anywhere."""
    y = (X @ [1.0, -2.0, 0.5]).round(3)
    train = _write(tmp_path / "train.csv", ["y", "a", "b", "c"], [y[:60], *X[:60].T])
    test = _write(
        tmp_path / "test.csv", ["c", "y", "b", "a"], [X[60:, 2], y[60:], *X[60:, 1::-1].T]
    )
    data = load_dataset(f"csv(path='{train}', target='y', test='{test}')")
    np.testing.assert_allclose(data.x_test, X[60:], rtol=1e-6)
    np.testing.assert_allclose(data.y_test.ravel(), y[60:], rtol=1e-6)
    assert data.task == "regression" and data.y_train.dtype == np.float32
    counts = _write(tmp_path / "n.csv", ["a", "b", "c", "n"], [*X.T, (X[:, 0] > 0).astype(int)])
    labels = load_dataset(f"csv:{counts}")
    assert labels.task == "classification" and labels.num_classes == 2
    price = (250000 + 30000 * X[:, 0]).astype(int)  # whole numbers, but no class labels
    prices = load_dataset(f"csv:{_write(tmp_path / 'p.csv', ['a', 'b', 'c', 'p'], [*X.T, price])}")
    assert prices.task == "regression" and prices.y_train.dtype == np.float32


@pytest.mark.parametrize(
    ("text", "spec_extra", "match"),
    [
        ("a,b,y\n1,2,3\n1,,4\n", "", r"line 3, column 'b': '' is not a number"),
        ("a,b,y\n1,2,3\n1,red,4\n", "", r"line 3, column 'b': 'red' is not a number"),
        ("a,b,y\n1,2,3\n1,2\n", "", r"line 3: 2 cells, the header has 3"),
        ("a,b,y\n1,2,3\n1,2,\n", "", r"line 3: the target cell is empty"),
        ("a,b,y\n1,2,3\n", ", target='z'", r"has no column 'z'; its columns: a, b, y"),
        ("y\n1\n2\n", "", r"has no feature column beside the target 'y'"),
        ("a,b,y\n", "", r"needs a header row and at least one data row"),
        ("a,b,y\n1,2,3\n", ", test_fraction=1.5", r"test_fraction"),
        ("a,y\n1,0\n2,1\n3,2\n", "", r"cannot hold out test_fraction=0.2: val_fraction="),
    ],
)
def test_a_malformed_table_is_refused_naming_where(tmp_path, text, spec_extra, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_dataset(f"csv(path='{path}'{spec_extra})")


def test_a_test_file_of_other_columns_or_new_classes_is_refused(tmp_path):
    train = _write(tmp_path / "train.csv", ["a", "kind"], [[1, 2, 3], ["x", "y", "x"]])
    other = _write(tmp_path / "o.csv", ["a", "label"], [[1], ["x"]])
    with pytest.raises(ConfigError, match=r"has columns \['a', 'label'\]"):
        load_dataset(f"csv(path='{train}', test='{other}')")
    new = _write(tmp_path / "n.csv", ["a", "kind"], [[1, 2], ["x", "z"]])
    with pytest.raises(ConfigError, match=r"has class\(es\) \['z'\] the training rows lack"):
        load_dataset(f"csv(path='{train}', test='{new}')")
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(f"csv:{tmp_path / 'missing.csv'}")


def test_a_csv_run_equals_the_same_arrays_in_an_npz_file(tmp_path, capsys):
    """The second path: the arrays `load_dataset` reads from the table, saved as an
    ``npz:`` file, train to the same test loss; a bad cell is one line and exit 2."""
    path = _write(tmp_path / "t.csv", ["a", "b", "c", "kind"], [*X.T, NAMES])
    data = load_dataset(f"csv:{path}")
    arrays = dict(x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
    np.savez(tmp_path / "t.npz", **arrays)
    losses = []
    for spec in (f"csv:{path}", f"npz:{tmp_path / 't.npz'}"):
        out = tmp_path / spec[:3]
        argv = ["train", "--dataset", spec, "--model", "mlp(features=(8,))", "--epochs", "3"]
        assert main([*argv, "--batch-size", "16", "--no-progress", "--out", str(out)]) == 0
        losses.append(json.loads((out / "summary.json").read_text())["test_loss"])
    assert losses[0] == losses[1]
    (tmp_path / "bad.csv").write_text("a,y\nfive,1\n2,0\n")
    assert (
        main(["train", "--dataset", f"csv:{tmp_path / 'bad.csv'}", "--out", str(tmp_path / "b")])
        == 2
    )
    err = capsys.readouterr().err
    assert "line 2, column 'a': 'five'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
