"""Loaders for real file formats, on tiny files written here: IDX (raw and .gz), CIFAR python
batches (with a planted malicious object that must be refused), npz."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from jtricks.data import load_dataset
from jtricks.data.loaders import read_cifar_batch, read_idx
from jtricks.errors import ConfigError


def _idx(array: np.ndarray) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
        + struct.pack(f">{array.ndim}i", *array.shape)
        + array.tobytes()
    )


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    for i, (name, arr) in enumerate(files.items()):
        data = _idx(arr)
        if i % 2:  # half of them gzipped
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    return tmp_path, files


def test_mnist_idx_raw_and_gz(mnist_dir):
    root, files = mnist_dir
    for name in ("mnist", "fashion_mnist"):
        ds = load_dataset(f"{name}:{root}")
        assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
        np.testing.assert_array_equal(ds.x_train[..., 0], files["train-images-idx3-ubyte"])
        np.testing.assert_array_equal(ds.y_test, files["t10k-labels-idx1-ubyte"])
        assert ds.num_classes == 10


def test_idx_errors(tmp_path, mnist_dir):
    root, _ = mnist_dir
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ConfigError, match="not an IDX file"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(_idx(np.zeros((4, 3), np.uint8))[:-5])
    with pytest.raises(ConfigError, match="needs 12"):
        read_idx(trunc)
    (root / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(ConfigError, match="has no t10k-images-idx3-ubyte"):
        load_dataset(f"mnist:{root}")
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(f"mnist:{tmp_path}/nowhere")


def _cifar_batch(path, n, label_key=b"labels", seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"x",
        label_key: list(rng.integers(0, 10, n)),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"f"] * n,
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar10_batches(tmp_path):
    b1 = _cifar_batch(tmp_path / "data_batch_1", 4, seed=1)
    _cifar_batch(tmp_path / "data_batch_2", 3, seed=2)
    _cifar_batch(tmp_path / "test_batch", 2, seed=3)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.x_train.shape == (7, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    # channel-major rows become NHWC: pixel (0, 0) of image 0 is (R, G, B) = data[0, [0, 1024, 2048]]
    np.testing.assert_array_equal(ds.x_train[0, 0, 0], b1[b"data"][0, [0, 1024, 2048]])
    np.testing.assert_array_equal(ds.y_train[:4], b1[b"labels"])


def test_cifar100_fine_and_coarse(tmp_path):
    for name in ("train", "test"):
        rng = np.random.default_rng(0)
        batch = {
            b"fine_labels": list(rng.integers(0, 100, 3)),
            b"coarse_labels": list(rng.integers(0, 20, 3)),
            b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    assert load_dataset(f"cifar100:{tmp_path}").num_classes == 100
    assert load_dataset(f"cifar100(path={str(tmp_path)!r}, labels='coarse')").num_classes == 20


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batch_with_planted_object_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    payload = {b"labels": [1], b"data": np.zeros((1, 3072), np.uint8), b"extra": evil}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError, match="refused global"):
        read_cifar_batch(path, b"labels")
    assert not marker.exists()
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError, match=str(path)):
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_cifar_malformed(tmp_path):
    (tmp_path / "b").write_bytes(
        pickle.dumps({b"labels": [1, 2], b"data": np.zeros((2, 10), np.uint8)})
    )
    with pytest.raises(ConfigError, match=r"\(N, 3072\)"):
        read_cifar_batch(tmp_path / "b", b"labels")
    (tmp_path / "c").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="refusing CIFAR batch"):
        read_cifar_batch(tmp_path / "c", b"labels")


def test_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(6, 3)),
        "y": np.arange(6) % 2,
        "x_test": rng.normal(size=(2, 3)),
        "y_test": np.array([0, 1]),
    }
    np.savez(tmp_path / "d.npz", **arrays)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    np.testing.assert_allclose(ds.x_train, arrays["x"], rtol=1e-6)
    assert ds.num_classes == 2
    np.savez(
        tmp_path / "obj.npz",
        x=np.array([object()] * 6),
        y=arrays["y"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
    )
    with pytest.raises(ConfigError, match="cannot read dataset file"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
