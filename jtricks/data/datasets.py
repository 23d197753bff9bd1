"""Dataset registry: MNIST-1D generated locally, and seeded synthetic data.

Every loader returns a `Dataset` of NumPy arrays (features float32, labels int32)
with a fixed train / test split. The validation split is carved out of the
training split by `jtricks.data.train_val_split`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.data.imbalance import degrade
from jtricks.data.targets import (
    TASK_NAMES,
    cast_targets,
    infer_task,
    is_whole,
    label_names,
    outputs_for,
)
from jtricks.errors import ConfigError, check_int, check_range


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$JTRICKS_CACHE_DIR``, else ``$XDG_CACHE_HOME/jtricks``,
    else ``~/.cache/jtricks``."""
    if os.environ.get("JTRICKS_CACHE_DIR"):
        return Path(os.environ["JTRICKS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jtricks"


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` (``.npz``) through a temporary file renamed over it, so a
    reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mnist1d(
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    imbalance: float = 1.0,
    label_noise: float = 0.0,
) -> Dataset:
    """MNIST-1D (Greydanus 2020): 10 classes of length-40 signals, generated locally.

    ``imbalance=R`` makes the training split long-tailed (class 0 ``R`` times class 9)
    and ``label_noise=p`` flips a fraction ``p`` of its labels, with a clean balanced
    validation split held out first (`jtricks.data.imbalance.degrade`).

    The defaults are the paper's: 5000 examples, 4000 train / 1000 test. The data
    are generated with the ``mnist1d`` package's own ``make_dataset`` (no download; its
    interpolation by `np.interp` directly, 2.7x faster and the same data bit for bit:
    `_generate_mnist1d`), then cached as ``.npz`` under `cache_dir`. The package seeds NumPy's and
    Python's global generators; their states are restored afterwards.

    Note: ``mnist1d`` centres and scales the whole set (train and test together)
    by one global mean and std. jtricks' own preprocessing is then refitted
    on the training split only.

    References:
      Greydanus, "Scaling down deep learning with MNIST-1D", https://arxiv.org/abs/2011.14439
    """
    num_samples = check_int("num_samples", num_samples, low=10)
    check_range(
        "train_split", train_split, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    seed = check_int("seed", seed, low=0)
    key = json.dumps({"n": num_samples, "split": train_split, "seed": seed}, sort_keys=True)
    path = cache_dir() / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a damaged cache file is regenerated, never trusted
            arrays = None
    if arrays is None:
        arrays = _generate_mnist1d(num_samples, train_split, seed)
        atomic_save_npz(path, **arrays)
    data = Dataset(
        name="mnist1d",
        x_train=arrays["x"].astype(np.float32),
        y_train=arrays["y"].astype(np.int32),
        x_test=arrays["x_test"].astype(np.float32),
        y_test=arrays["y_test"].astype(np.int32),
        num_classes=10,
    )
    return degrade(data, imbalance=imbalance, label_noise=label_noise, seed=seed)


def _generate_mnist1d(num_samples: int, train_split: float, seed: int) -> dict[str, np.ndarray]:
    """The ``mnist1d`` package's ``make_dataset`` with these arguments, NumPy's and
    Python's global generators restored afterwards, and its linear interpolation done by
    `np.interp` directly: the package builds a scipy ``interp1d`` for each of its 20,000
    calls (2.0 of the 2.7 s the default set took on the 2-core CPU), which for a 1-D
    float64 signal evaluates with `np.interp` itself, so the data are the same bit for
    bit (`tests/test_data.py`)."""
    from mnist1d.data import get_dataset_args, make_dataset

    transform = importlib.import_module("mnist1d.transform")  # the package's name is a function

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    slow, transform.interpolate = transform.interpolate, _interpolate
    try:
        raw = make_dataset(args)
    finally:
        transform.interpolate = slow
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    """``mnist1d.transform.interpolate``: ``x`` resampled linearly at ``n`` points
    spread evenly over the same span."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    shape: tuple[int, ...] | int = (40,),
    num_classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
    imbalance: float = 1.0,
    label_noise: float = 0.0,
) -> Dataset:
    """Seeded Gaussian-blob classification data of any shape, for tests and throughput runs.

    Each class ``c`` has a mean ``mu_c ~ N(0, I)`` over the flattened features;
    an example is ``x = mu_y + noise * N(0, I)`` with ``y`` uniform over classes.
    Same seed, same data. ``imbalance`` and ``label_noise``: as for `mnist1d`.
    """
    num_train = check_int("num_train", num_train, low=1)
    num_test = check_int("num_test", num_test, low=1)
    num_classes = check_int("num_classes", num_classes, low=2)
    check_range("noise", noise, low=0.0)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ConfigError(f"shape must be a tuple of positive integers; got {shape!r}")
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    means = rng.standard_normal((num_classes, dim))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, n)
        x = means[y] + noise * rng.standard_normal((n, dim))
        return x.reshape((n, *shape)).astype(np.float32), y.astype(np.int32)

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    data = Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)
    return degrade(data, imbalance=imbalance, label_noise=label_noise, seed=seed)


def npz(path: str) -> Dataset:
    """A dataset from a ``.npz`` file holding ``x``, ``y``, ``x_test`` and ``y_test`` arrays
    (``x_train``, ``y_train`` also name the first two: `array_names`), and optionally
    ``x_val`` and ``y_val`` (the file's own validation split, used instead of carving
    ``val_fraction`` out of ``x``), or ``mask`` and ``mask_test`` (0/1, the targets'
    shape: which positions count, for segmentation and language models).

    Read with ``allow_pickle=False``: object arrays are refused, never unpickled.
    The targets' kind and shape give the task and the model's output width (labels,
    tokens, labels per position, a 0/1 matrix, real values: see `jtricks.data.targets`);
    ``--task`` may name another that reads them (e.g. ``multilabel`` for 0/1 reals).

    Raises:
      ConfigError: naming the file for a missing, unreadable or malformed file.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"dataset file {str(p)!r} is a folder; npz:PATH takes one .npz file", param="dataset"
        )
    if not p.is_file():
        raise ConfigError(f"dataset file {str(p)!r} does not exist", param="dataset")
    if not zipfile.is_zipfile(p):
        raise ConfigError(
            f"dataset file {str(p)!r} is not an .npz file (a zip archive of .npy arrays, as "
            "numpy.savez writes); it is never read as a pickle",
            param="dataset",
        )
    try:
        with np.load(p, allow_pickle=False) as f:
            names = array_names(f"dataset file {str(p)!r}", f.files)
            arrays = {name: f[key] for name, key in names.items()}
    except ConfigError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        if "pickle" in str(e):
            why = "it holds object arrays, which are refused (never unpickled)"
        raise ConfigError(f"cannot read dataset file {str(p)!r}: {why}", param="dataset") from None
    return arrays_dataset(f"npz:{p}", f"dataset file {str(p)!r}", arrays)


def arrays_dataset(
    name: str, where: str, arrays: dict[str, np.ndarray], classes: Any = None
) -> Dataset:
    """The `Dataset` of ``x, y, x_test, y_test`` (and optional ``mask``, ``mask_test``)
    arrays, as an ``npz:`` file holds them: numeric inputs, both splits non-empty, the
    task their targets imply (`jtricks.data.targets.infer_task`); text labels are class
    names, numbered in sorted order (`named_labels`), or ``classes`` names the labels.
    ``where`` names the source in errors.

    Raises:
      ConfigError (``param="dataset"``).
    """
    arrays, named = named_labels(where, arrays)
    for k in ("x", "x_test", "x_val")[: 3 if "x_val" in arrays else 2]:
        dtype = arrays[k].dtype
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(
            dtype, np.complexfloating
        ):
            raise ConfigError(
                f"{where}: {k} must be numeric (integer or real); got dtype {dtype}",
                param="dataset",
            )
    if any(arrays[k].size == 0 for k in ("y", "y_test", "y_val") if k in arrays):
        raise ConfigError(
            f"{where}: empty dataset (no training, validation or test examples)",
            param="dataset",
        )
    task = infer_task(where, arrays["x"], arrays["y"], _held_out(arrays))
    return npz_dataset(name, arrays, task, named or classes)


def named_labels(
    where: str, arrays: dict[str, np.ndarray], numbers: bool = False
) -> tuple[dict, tuple | None]:
    """``arrays`` with text labels ``y`` (and ``y_test``, ``y_val``) as the indices of
    their names in sorted order, and the names; as they are, and ``None``, otherwise.
    With ``numbers``: whole-number class labels below 0 among them (-1 and +1, as LIBSVM
    files and SVM code write two classes) are names too, in the order of their values
    (``"-1"``, ``"1"``), as scikit-learn's ``LabelEncoder`` numbers them.

    Raises:
      ConfigError (``param="dataset"``): a held-out name or label that ``y`` lacks.
    """
    held = [k for k in ("y_test", "y_val") if k in arrays]
    ys = [np.asarray(arrays[k]) for k in ("y", *held)]
    if numbers:
        if any(y.ndim != 1 or not is_whole(y) for y in ys) or min(y.min() for y in ys) >= 0:
            return arrays, None
        ys = [y.astype(np.int64) for y in ys]
    elif not all(y.dtype.kind in "US" and y.ndim == 1 for y in ys):
        return arrays, None  # numbers, or a mix the task inference refuses in one line
    key = int if numbers else None
    names, labels, unseen = label_names(ys[0], np.concatenate(ys[1:]), key)
    if unseen:
        which = f"{' and '.join(held)} {'holds' if len(held) == 1 else 'hold'}"
        what = (
            f"label(s) {[int(u) for u in unseen]} that the training labels ({', '.join(names)}) lack"
            if numbers
            else f"class name(s) {unseen[:5]} that y lacks"
        )
        raise ConfigError(f"{where}: {which} {what}", param="dataset")
    arrays, start = dict(arrays), 0
    for k in ("y", *held):
        arrays[k], start = labels[start : start + len(arrays[k])], start + len(arrays[k])
    return arrays, names


def _held_out(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The test targets, and the validation ones where the file has them (of the same
    shape per example: else the validation data's own check names them)."""
    y_test, y_val = arrays["y_test"], arrays.get("y_val")
    if (
        y_val is None
        or y_val.shape[1:] != y_test.shape[1:]
        or y_val.dtype.kind != y_test.dtype.kind
    ):
        return y_test
    return np.concatenate([y_test, y_val])


MASKS = ("mask", "mask_test")
"""The optional arrays of an ``npz:`` file: 0/1 masks of ``y`` and ``y_test``'s shape."""
ARRAYS = ("x", "y", "x_test", "y_test")
"""The arrays an ``npz:`` file must hold (``x_train``, ``y_train`` also name the first two)."""
VAL_ARRAYS = ("x_val", "y_val")
"""An ``npz:`` file's own validation split (both or neither), used instead of carving
``val_fraction`` out of the training split."""
TRAIN_NAMES = {"x_train": "x", "y_train": "y", "mask_train": "mask"}
"""The ``*_train`` spelling (`Dataset`'s and Keras's) of an ``npz:`` file's arrays."""


def array_names(where: str, keys: Iterable[str]) -> dict[str, str]:
    """``{npz name: key}`` of the arrays among ``keys`` that an ``npz:`` file's reader
    takes (`ARRAYS`, `MASKS`), ``x_train`` read as ``x`` (`TRAIN_NAMES`).

    Raises:
      ConfigError (``param="dataset"``): an array missing, or named both ways.
    """
    names: dict[str, str] = {}
    for key in keys:
        name = TRAIN_NAMES.get(key, key)
        if name in names:
            raise ConfigError(
                f"{where} holds both {names[name]} and {key}: give the training split once",
                param="dataset",
            )
        if name in (*ARRAYS, *MASKS, *VAL_ARRAYS):
            names[name] = key
    missing = [k for k in ARRAYS if k not in names]
    if len([k for k in VAL_ARRAYS if k in names]) == 1:
        missing = [k for k in VAL_ARRAYS if k not in names]
    if missing:
        raise ConfigError(
            f"{where} lacks array(s) {missing}; it must hold x (or x_train), y (or y_train), "
            "x_test, y_test, and x_val with y_val or neither",
            param="dataset",
        )
    return names


def _masks(where: str, arrays: dict[str, np.ndarray], task: str) -> tuple:
    """``(mask_train, mask_test)`` as float32, or ``(None, None)``; checked: both or
    neither, the targets' shape, 0/1 values, and a task that reads them."""
    present = [k for k in MASKS if k in arrays]
    if not present:
        return None, None
    if len(present) == 1 or task not in ("segmentation", "lm"):
        why = (
            "give both mask and mask_test"
            if len(present) == 1
            else f"the {task} task reads no mask (segmentation and lm do)"
        )
        raise ConfigError(f"{where}: {why}", param="dataset")
    for k, y in (("mask", "y"), ("mask_test", "y_test")):
        m = arrays[k]
        if m.shape != arrays[y].shape or not np.isin(m, (0, 1)).all():
            raise ConfigError(
                f"{where}: {k} must be 0/1 values of {y}'s shape {arrays[y].shape}; got "
                f"{m.dtype} {m.shape}",
                param="dataset",
            )
    return arrays["mask"].astype(np.float32), arrays["mask_test"].astype(np.float32)


def npz_dataset(
    name: str, arrays: dict[str, np.ndarray], task: str, classes: Any = None
) -> Dataset:
    """The `Dataset` of ``x, y, x_test, y_test`` arrays read for ``task`` (a spec name of
    `jtricks.data.targets`): its output width, targets in the task's dtype, and inputs as
    float32 (int32 token ids for a language model)."""
    where = f"dataset {name!r}"
    if task == "classification" and classes is None:
        arrays, classes = named_labels(where, arrays, numbers=True)
    outputs = outputs_for(task, where, arrays["x"], arrays["y"], _held_out(arrays))
    mask_train, mask_test = _masks(where, arrays, task)
    x_dtype = np.int32 if task == "lm" else np.float32
    val = None
    if "x_val" in arrays:
        if mask_train is not None:
            raise ConfigError(
                f"{where}: x_val, y_val with masks: a validation split's mask is not read; "
                "leave x_val, y_val out (val_fraction carves one, masks included)",
                param="dataset",
            )
        val = (arrays["x_val"].astype(x_dtype), cast_targets(task, arrays["y_val"]))
    return Dataset(
        val=val,
        mask_train=mask_train,
        mask_test=mask_test,
        name=name,
        x_train=arrays["x"].astype(x_dtype),
        y_train=cast_targets(task, arrays["y"]),
        x_test=arrays["x_test"].astype(x_dtype),
        y_test=cast_targets(task, arrays["y_test"]),
        num_classes=outputs,
        task=task,
        classes=tuple(classes) if classes is not None and task == "classification" else None,
    )


def for_task(data: Dataset, task_name: str) -> Dataset:
    """``data`` read for the task named ``task_name`` (a `Task.name`) when it is not the
    dataset's own: the output width and the targets' dtype of that task (e.g. a file's
    integer labels as ``--task regression`` targets, 0/1 reals as ``--task multilabel``).

    Raises:
      ConfigError (``param="task"``): targets that task cannot read.
    """
    task = TASK_NAMES.get(task_name)
    own = data.task.split("(", 1)[0].strip()
    if task is None or task == {"language_model": "lm", "binary": "multilabel"}.get(own, own):
        return data
    arrays = {"x": data.x_train, "y": data.y_train, "x_test": data.x_test, "y_test": data.y_test}
    if data.mask_train is not None:
        arrays.update(mask=data.mask_train, mask_test=data.mask_test)
    if data.val is not None:
        arrays.update(x_val=data.val[0], y_val=data.val[1])
    return dataclasses.replace(npz_dataset(data.name, arrays, task), loss_floor=None)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": mnist1d,
    "synthetic": synthetic,
    "npz": npz,
}
