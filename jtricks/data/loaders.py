"""Loaders for dataset files users already have on disk: MNIST / Fashion-MNIST IDX files
and CIFAR-10 / CIFAR-100 "python" batches. Selected with ``--dataset mnist:PATH``,
``fashion_mnist:PATH``, ``cifar10:PATH`` or ``cifar100:PATH``.

CIFAR batches are pickles. They are read with a restricted unpickler that only
rebuilds NumPy arrays, bytes, strings, numbers, lists and dicts; any other
global (``os.system``, ``builtins.eval``, ...) is refused before it can run.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.errors import ConfigError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``): magic ``0 0 type ndim``, big-endian int32 sizes, data.

    Raises:
      ConfigError: naming the file if it is missing, truncated or not IDX.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ConfigError(f"cannot read IDX file {str(path)!r}: {e}", param="dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConfigError(f"{str(path)!r} is not an IDX file (bad magic number)", param="dataset")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(
            f"IDX file {str(path)!r} is truncated (incomplete header)", param="dataset"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">i4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(
            f"IDX file {str(path)!r} holds {len(raw) - header} data bytes; its header {shape} needs {expected}",
            param="dataset",
        )
    return np.frombuffer(raw[header:], dtype).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (root / name).is_file():
            return root / name
    raise ConfigError(f"{str(root)!r} has no {stem} (or {stem}.gz)", param="dataset")


def mnist(path: str, name: str = "mnist") -> Dataset:
    """MNIST (or Fashion-MNIST) from a folder holding the four IDX files
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``). Images come as ``(N, 28, 28, 1)``
    float32 in [0, 255]; scale them with ``--preprocess``."""
    root = Path(path)
    if root.is_file():
        raise ConfigError(
            f"dataset folder {str(root)!r} is a file; give the folder that holds the four "
            "IDX files",
            param="dataset",
        )
    if not root.is_dir():
        raise ConfigError(f"dataset folder {str(root)!r} does not exist", param="dataset")
    x, y = (
        read_idx(_find(root, "train-images-idx3-ubyte")),
        read_idx(_find(root, "train-labels-idx1-ubyte")),
    )
    xt, yt = (
        read_idx(_find(root, "t10k-images-idx3-ubyte")),
        read_idx(_find(root, "t10k-labels-idx1-ubyte")),
    )
    for arr, what in ((x, "images"), (xt, "images")):
        if arr.ndim != 3:
            raise ConfigError(
                f"{name} {what} must have 3 dimensions (N, H, W); got shape {arr.shape}",
                param="dataset",
            )
    return Dataset(
        name=name,
        x_train=x[..., None].astype(np.float32),
        y_train=y.astype(np.int32),
        x_test=xt[..., None].astype(np.float32),
        y_test=yt.astype(np.int32),
        num_classes=10,
    )


def fashion_mnist(path: str) -> Dataset:
    """Fashion-MNIST: same file names and format as `mnist`."""
    return mnist(path, name="fashion_mnist")


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that rebuilds NumPy arrays and plain containers, and refuses every other global."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_cifar_batch(path: str | Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR "python" batch: ``(images (N, 32, 32, 3) uint8, labels (N,))``.

    Raises:
      ConfigError: naming the file if it is missing, not a batch, or holds anything
        besides arrays and plain values (a planted object is refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CIFAR batch {str(path)!r} does not exist", param="dataset")
    try:
        obj = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"refusing CIFAR batch {str(path)!r}: {e}", param="dataset") from None
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        raise ConfigError(
            f"{str(path)!r} is not a CIFAR python batch (expected a dict with b'data' and {label_key!r})",
            param="dataset",
        )
    data, labels = obj[b"data"], np.asarray(obj[label_key])
    if (
        not isinstance(data, np.ndarray)
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(labels) != len(data)
    ):
        raise ConfigError(
            f"{str(path)!r}: b'data' must be an (N, 3072) array with N labels", param="dataset"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    return images, labels


def cifar10(path: str) -> Dataset:
    """CIFAR-10 from the ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``).
    Images ``(N, 32, 32, 3)`` float32 in [0, 255]."""
    root = Path(path)
    batches = sorted(root.glob("data_batch_*"))
    if not batches:
        raise ConfigError(
            f"{str(root)!r} has no data_batch_* files (is it cifar-10-batches-py?)", param="dataset"
        )
    parts = [read_cifar_batch(b, b"labels") for b in batches]
    xt, yt = read_cifar_batch(root / "test_batch", b"labels")
    return Dataset(
        "cifar10",
        np.concatenate([p[0] for p in parts]).astype(np.float32),
        np.concatenate([p[1] for p in parts]).astype(np.int32),
        xt.astype(np.float32),
        yt.astype(np.int32),
        10,
    )


def cifar100(path: str, labels: str = "fine") -> Dataset:
    """CIFAR-100 from the ``cifar-100-python`` folder (``train``, ``test``); ``labels`` is
    ``"fine"`` (100 classes) or ``"coarse"`` (20)."""
    if labels not in ("fine", "coarse"):
        raise ConfigError(f"labels must be 'fine' or 'coarse'; got {labels!r}", param="dataset")
    key = b"fine_labels" if labels == "fine" else b"coarse_labels"
    root = Path(path)
    x, y = read_cifar_batch(root / "train", key)
    xt, yt = read_cifar_batch(root / "test", key)
    return Dataset(
        "cifar100",
        x.astype(np.float32),
        y.astype(np.int32),
        xt.astype(np.float32),
        yt.astype(np.int32),
        100 if labels == "fine" else 20,
    )
