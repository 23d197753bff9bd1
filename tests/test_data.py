"""Datasets, preprocessing fitted on training data only, splits and device batching."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest

from jtricks.cli import main
from jtricks.data import (
    DATASETS,
    Scaler,
    epoch_indices,
    load_dataset,
    mnist1d,
    synthetic,
    train_val_split,
)
from jtricks.errors import ConfigError


def test_registry_names():
    assert set(DATASETS) == {"mnist1d", "synthetic", "npz"}


def test_synthetic_is_seeded_and_shaped():
    a = synthetic(num_train=50, num_test=20, shape=(4, 4, 3), num_classes=3, seed=7)
    b = synthetic(num_train=50, num_test=20, shape=(4, 4, 3), num_classes=3, seed=7)
    c = synthetic(num_train=50, num_test=20, shape=(4, 4, 3), num_classes=3, seed=8)
    assert a.x_train.shape == (50, 4, 4, 3) and a.x_test.shape == (20, 4, 4, 3)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.y_train.min() >= 0 and a.y_train.max() < 3


def test_spec_loading_matches_direct_call():
    a = load_dataset("synthetic(num_train=30, num_test=10, shape=(5,), seed=3)")
    b = synthetic(num_train=30, num_test=10, shape=(5,), seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)


def test_mnist1d_small_generation_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("JTRICKS_CACHE_DIR", str(tmp_path))
    state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what we check
    a = mnist1d(num_samples=100, seed=1)
    # the mnist1d package seeds NumPy's global generator; we restore it
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1
    b = mnist1d(num_samples=100, seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (80, 40) and a.x_test.shape == (20, 40)
    assert a.num_classes == 10 and set(np.unique(a.y_train)) <= set(range(10))
    files[0].write_bytes(b"not an npz")  # a damaged cache is regenerated, not trusted
    c = mnist1d(num_samples=100, seed=1)
    np.testing.assert_array_equal(a.x_train, c.x_train)


def test_mnist1d_is_the_packages_own_data_bit_for_bit():
    """jtricks generates MNIST-1D with the package's generator, its interpolation done by
    `np.interp` directly (`_generate_mnist1d`): the same float64 arrays as the package's
    ``make_dataset`` alone, and the package's own function is back afterwards."""
    import importlib

    from mnist1d.data import get_dataset_args, make_dataset

    from jtricks.data.datasets import _generate_mnist1d

    transform = importlib.import_module("mnist1d.transform")
    own = transform.interpolate
    got = _generate_mnist1d(300, 0.7, 5)
    assert transform.interpolate is own
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = 300, 0.7, 5
    state = np.random.get_state()  # noqa: NPY002 - make_dataset seeds the global generator
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    for key in ("x", "y", "x_test", "y_test"):
        want = np.asarray(raw[key])
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_standardize_uses_training_statistics_only(tiny_data):
    x_tr, x_te = tiny_data.x_train.astype(np.float64), tiny_data.x_test
    s = Scaler.fit("standardize", x_tr)
    # the formula, written out: global mean and std of the training split
    np.testing.assert_allclose(s(x_te), (x_te - x_tr.mean()) / x_tr.std(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s(x_tr).mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(s(x_tr).std(), 1.0, atol=1e-5)
    # changing the test split changes nothing in the fitted statistics
    s2 = Scaler.fit("standardize", x_tr)
    np.testing.assert_array_equal(s2(x_te + 100.0), s(x_te + 100.0))
    assert abs(s(x_te + 100.0).mean()) > 10  # test data are not re-centred


def test_standardize_per_feature_and_constant_feature():
    x = np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1)
    s = Scaler.fit("standardize", x, per_feature=True)
    out = s(x)
    np.testing.assert_allclose(out[:, 0], (x[:, 0] - 4.5) / x[:, 0].std(), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], 0.0)  # std 0 is treated as 1


def test_the_spec_can_scale_each_feature_and_blocks_give_the_same(capsys):
    """Tabular features of other units (ages, incomes): ``standardize(per_feature=True)``
    and ``minmax(-1, 1, per_feature=True)`` give each column the formula written out
    (one scalar left the ages nearly constant); `fit_chunks` over row blocks, as shards
    are read, equals `fit` on the whole; the CLI takes the spec."""
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(50, 10, 300), rng.normal(5e4, 1e4, 300)]
    s = Scaler.fit("standardize(per_feature=True)", x)
    np.testing.assert_allclose(s(x), (x - x.mean(0)) / x.std(0), rtol=1e-5, atol=1e-5)
    m = Scaler.fit("minmax(-1, 1, per_feature=True)", x)
    lo, hi = x.min(0), x.max(0)
    np.testing.assert_allclose(m(x), -1 + 2 * (x - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    for spec, whole in (
        ("standardize(per_feature=True)", s),
        ("minmax(-1, 1, per_feature=True)", m),
    ):
        blocks = Scaler.fit_chunks(spec, lambda: (x[i : i + 70] for i in range(0, 300, 70)))
        np.testing.assert_allclose(blocks(x), whole(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="per_feature must be True or False; got 'yes'"):
        Scaler.fit("standardize(per_feature='yes')", x)
    assert main(["train", "--preprocess", "standardize(per_feature=1)", "--steps", "1"]) == 2
    assert "per_feature must be True or False" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "low", "high"), [("minmax", 0.0, 1.0), ("minmax(-1, 1)", -1.0, 1.0)]
)
def test_minmax_maps_training_range(tiny_data, spec, low, high):
    x_tr = tiny_data.x_train
    s = Scaler.fit(spec, x_tr)
    out = s(x_tr)
    np.testing.assert_allclose([out.min(), out.max()], [low, high], atol=1e-6)
    x_te = tiny_data.x_test.astype(np.float64)
    expect = low + (x_te - x_tr.min()) * (high - low) / (x_tr.max() - x_tr.min())
    np.testing.assert_allclose(s(x_te), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["zscore", "minmax(2, 1)", "standardize(3)", "minmax(foo=1)"])
def test_bad_preprocessing_specs(spec):
    with pytest.raises(ConfigError):
        Scaler.fit(spec, np.ones((4, 2)))


def test_split_is_seeded_disjoint_and_complete(tiny_data):
    x, y = tiny_data.x_train, tiny_data.y_train
    a = train_val_split(x, y, 0.25, seed=1)
    b = train_val_split(x, y, 0.25, seed=1)
    c = train_val_split(x, y, 0.25, seed=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[2], c[2])
    assert len(a[3]) == 50 and len(a[1]) == 150
    rows = {tuple(r) for r in np.concatenate([a[0], a[2]])}
    assert rows == {tuple(r) for r in x}


def test_stratified_split_keeps_class_proportions():
    y = np.repeat(np.arange(4), [40, 20, 100, 40]).astype(np.int32)
    x = np.arange(len(y), dtype=np.float32)[:, None]
    _, y_tr, _, y_val = train_val_split(x, y, 0.1, seed=0, stratify=True)
    np.testing.assert_array_equal(np.bincount(y_val), [4, 2, 10, 4])
    np.testing.assert_array_equal(np.bincount(y_tr), [36, 18, 90, 36])


@pytest.mark.parametrize(
    ("y", "stratify", "match"),
    [
        (np.linspace(0, 1, 40, dtype=np.float32)[:, None], True, "float32 of shape \\(40, 1\\)"),
        (np.arange(50) % 3, True, "same examples; got 40 and 50"),
        (np.arange(40), True, "stratified: each class gives round"),
    ],
)
def test_split_refuses_targets_it_cannot_split(y, stratify, match):
    """Real-valued targets cannot be stratified (they were compared value by value); x and
    y of different lengths were split apart; classes of one example each leave none."""
    with pytest.raises(ConfigError, match=match):
        train_val_split(np.zeros((40, 2)), y, 0.2, seed=0, stratify=stratify)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(tiny_data, fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(tiny_data.x_train, tiny_data.y_train, fraction, seed=0)


def test_epoch_indices_are_a_shuffled_partial_permutation():
    idx = jax.jit(epoch_indices, static_argnums=(1, 2, 3))(jax.random.key(0), 103, 10, 10)
    idx = np.asarray(idx)
    assert idx.shape == (10, 10)
    assert len(np.unique(idx)) == 100 and idx.min() >= 0 and idx.max() < 103
    other = np.asarray(epoch_indices(jax.random.key(1), 103, 10, 10))
    assert not np.array_equal(idx, other)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.array([[0.0, np.nan]]), np.array([0]), "non-finite"),
        (np.array([[0.0, np.inf]]), np.array([0]), "non-finite"),
        (np.zeros((3, 2)), np.array([0, 1]), "3 examples but 2 labels"),
        (np.zeros((2, 2)), np.array([0, 5]), r"labels must lie in \[0, 3\]"),
        (np.zeros((2, 2)), np.array([0, -1]), r"labels must lie in \[0, 3\]"),
        (np.zeros((2,)), np.array([0, 1]), "shape"),
        (np.zeros((2, 2)), np.array([0.5, 1.0]), "integers"),
    ],
)
def test_bad_arrays_are_rejected(x, y, match):
    from jtricks.data import validate_arrays

    with pytest.raises(ConfigError, match=match):
        validate_arrays(x, y, 4, where="test data")


def test_digits_ship_with_scikit_learn_and_split_stratified():
    import gzip
    from importlib import resources

    data = load_dataset("digits")
    # an independent read of the file the scikit-learn wheel carries: 64 pixels, a label
    raw = resources.files("sklearn.datasets").joinpath("data", "digits.csv.gz").read_bytes()
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()), delimiter=",")
    assert table.shape == (1797, 65)
    ours = np.concatenate(
        [
            np.c_[data.x_train.reshape(-1, 64), data.y_train],
            np.c_[data.x_test.reshape(-1, 64), data.y_test],
        ]
    )
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(table, axis=0))
    assert data.x_train.shape[1:] == (8, 8, 1) and data.num_classes == 10
    for c in range(10):  # stratified: round(0.2 N_c) of each class in the test split
        n_c = int((table[:, -1] == c).sum())
        assert int((data.y_test == c).sum()) == round(0.2 * n_c)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("digits(test_fraction=1.5)")


def test_digits_train_from_the_cli(tmp_path, capsys):
    from jtricks.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "mlp(features=(32,))", "--steps", "150"]
    assert main([*args, "--batch-size", "64", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.85  # 8x8 digits are easy: an MLP passes 0.9 quickly


@pytest.mark.parametrize("spec", ["standardize", "minmax(-1, 1)", "none"])
@pytest.mark.parametrize("per_feature", [False, True])
def test_a_scaler_goes_through_json_exactly(spec, per_feature):
    """What a run folder records (`Scaler.to_json`) scales inputs to the same bits."""

    from jtricks.data import Scaler

    x = np.random.default_rng(3).normal(2.0, 3.0, size=(50, 4, 2)).astype(np.float32)
    fitted = Scaler.fit(spec, x, per_feature=per_feature)
    back = Scaler.from_json(json.loads(json.dumps(fitted.to_json())))
    np.testing.assert_array_equal(back(x), fitted(x))
    assert back.kind == fitted.kind and back.offset == fitted.offset
