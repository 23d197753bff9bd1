"""What a user's target arrays are for: the task their kind and shape imply, and the
model's output width for a task, so that files (``npz:``, ``shards:``) reach every task.

The kinds, for inputs ``x`` and targets ``y`` with N examples:

=====================  ==========================================  ====================
task                   targets                                     outputs (num_classes)
=====================  ==========================================  ====================
``classification``     integer labels ``(N,)``                     ``max(y) + 1``
``lm``                 integer tokens, ``x`` integer, same shape   ``max(x, y) + 1``
``segmentation``       integer labels per position of ``x``        ``max(y) + 1``
``multilabel``         a 0/1 matrix ``(N, L)`` (int, bool, float)  ``L``
``regression``         real values ``(N,)`` or ``(N, T...)``        ``prod(T...)`` or 1
=====================  ==========================================  ====================

`infer_task` reads the table top down (a 0/1 matrix of reals is a regression unless
``--task multilabel`` says otherwise, and reals are a regression even when they are
whole numbers); `outputs_for` gives the width for the task a user names instead, which
reads labels saved as whole-number reals (``0.0, 1.0, 2.0``, as pandas often writes
them) as labels, and `cast_targets` the dtype that task reads. Class labels below 0
(-1/+1) are numbered by their values before they get here
(`jtricks.data.datasets.named_labels`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jtricks.errors import ConfigError

TASK_NAMES = {  # `Task.name` -> the spec name used above
    "classification": "classification",
    "multi-label": "multilabel",
    "regression": "regression",
    "segmentation": "segmentation",
    "language model": "lm",
}


def label_names(
    train: Any, held_out: Any, key: Any = None
) -> tuple[tuple[str, ...], np.ndarray, list[str]]:
    """``(names, labels, unseen)`` of text class labels: the training split's names in
    sorted order (by ``key`` of a name: ``int`` for whole-number labels), every label of
    ``train`` then ``held_out`` as its name's index (int64; ``-1`` for a name the
    training split lacks), and those unseen held-out names."""
    names = tuple(sorted({str(c) for c in train}, key=key))
    number = {n: i for i, n in enumerate(names)}
    everything = [str(c) for c in train] + [str(c) for c in held_out]
    labels = np.asarray([number.get(c, -1) for c in everything], np.int64)
    return names, labels, sorted({c for c in everything if c not in number}, key=key)


def _is_integer(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_


def _per_position(x: np.ndarray, y: np.ndarray) -> bool:
    return y.ndim >= 2 and tuple(y.shape[1:]) == tuple(x.shape[1 : y.ndim])


def _zero_one(*ys: np.ndarray) -> bool:
    return all(np.isin(y, (0, 1)).all() for y in ys)


def infer_task(where: str, x: np.ndarray, y: np.ndarray, y_test: np.ndarray) -> str:
    """The task spec the targets imply (see the module's table).

    Raises:
      ConfigError: targets that are neither integers nor reals, of mixed kinds across the
        splits, or integer targets of a shape none of the tasks reads.
    """
    kinds = {
        "integer" if _is_integer(a) else "real" if _is_real(a) else "other" for a in (y, y_test)
    }
    if "other" in kinds:
        dtype = next(a.dtype for a in (y, y_test) if not (_is_integer(a) or _is_real(a)))
        hint = ""
        if dtype.kind in "USO":  # class names: the labels are their indices
            hint = (
                " (class names are read as labels when y and y_test (and y_val) all hold "
                "names, one per example; or save their indices: names, y = np.unique(y, "
                "return_inverse=True))"
            )
        raise ConfigError(
            f"{where}: targets must be integer class labels or real-valued regression "
            f"targets; got dtype {dtype}{hint}",
            param="dataset",
        )
    if len(kinds) > 1:
        raise ConfigError(
            f"{where}: training and test targets must be of one kind (integer labels or real "
            f"targets); got {y.dtype} and {y_test.dtype}",
            param="dataset",
        )
    if kinds == {"real"}:
        return "regression"
    if y.ndim == 1:
        return "classification"
    if _is_integer(x) and x.shape[1:] == y.shape[1:]:
        return "lm"
    if _per_position(x, y):
        return "segmentation"
    if y.ndim == 2 and _zero_one(y, y_test):
        return "multilabel"
    raise ConfigError(
        f"{where}: integer targets of shape {y.shape[1:]} per example are none of: labels "
        f"(N,), labels per position of the inputs {x.shape[1:]}, tokens of the inputs' "
        "shape, a 0/1 matrix (N, L)",
        param="dataset",
    )


def _is_real(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def is_whole(a: np.ndarray) -> bool:
    """Integers, or reals that are all finite whole numbers within int32."""
    if _is_integer(a):
        return True
    if not _is_real(a):
        return False
    a = np.asarray(a)
    return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)) and np.all(np.abs(a) < 2**31))


def outputs_for(task: str, where: str, x: np.ndarray, y: np.ndarray, y_test: np.ndarray) -> int:
    """The model's output width for ``task`` (a spec name of the table) on these targets.
    ``x`` may be a stand-in of the inputs' shape and dtype (one zero row, for shards on
    disk): a language model's vocabulary then comes from the targets alone.

    Raises:
      ConfigError: targets the task cannot read (reals for a task of labels, a 0/1 task
        given other values).
    """
    if task in ("classification", "segmentation", "lm"):
        arrays = (x, y, y_test) if task == "lm" else (y, y_test)
        if not all(is_whole(a) for a in arrays):
            raise ConfigError(
                f"{where}: the {task} task reads integer "
                f"{'tokens' if task == 'lm' else 'labels'} (or reals holding whole "
                f"numbers); got targets of dtype {y.dtype}"
                + (f" and inputs of dtype {x.dtype}" if task == "lm" else "")
                + " with other values",
                param="task",
            )
        if task == "segmentation" and not _per_position(x, y):
            raise ConfigError(
                f"{where}: the segmentation task reads labels per position of the inputs "
                f"{x.shape[1:]}; got targets of shape {y.shape[1:]} per example",
                param="task",
            )
        low, high = min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays)
        if low < 0:
            raise ConfigError(
                f"{where}: {task} labels must lie in [0, C-1] for C classes; got values in "
                f"[{low}, {high}] (number them from 0, as np.unique(y, return_inverse=True) "
                "does, or give them as class names, text such as neg and pos, which are "
                "numbered in sorted order)",
                param="dataset",
            )
        return high + 1
    if task == "multilabel" and not _zero_one(y, y_test):
        raise ConfigError(
            f"{where}: the multilabel task reads 0/1 targets; these hold other values",
            param="task",
        )
    return 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))


def cast_targets(task: str, y: np.ndarray) -> np.ndarray:
    """``y`` in the dtype ``task`` reads: int32 labels and tokens, float32 otherwise."""
    return y.astype(np.int32 if task in ("classification", "segmentation", "lm") else np.float32)


__all__ = ["TASK_NAMES", "cast_targets", "infer_task", "is_whole", "label_names", "outputs_for"]
