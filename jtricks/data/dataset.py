"""`Dataset`: a fixed train / test split of NumPy arrays for one task, checked when built."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from jtricks.errors import ConfigError

MAX_OUTPUTS = 2**20
"""The largest output width (class count, vocabulary) a dataset may declare: beyond it a
model's head would not fit in memory, and XLA would abort instead of erroring."""


@dataclass(frozen=True)
class Dataset:
    """A dataset with a fixed train / test split, for one task.

    Attributes:
      name: registry name it was loaded under.
      x_train, y_train: training inputs ``(N, ...)`` and targets ``(N, ...)``: for
        classification float32 features and int32 labels ``(N,)``.
      x_test, y_test: test split, touched once for the final figure.
      num_classes: the model's output width: the class count (labels lie in
        ``[0, num_classes)``), the number of targets of a regression, the classes per
        position of a segmentation, the vocabulary of a language model.
      task: the task spec it is meant for (`jtricks.tasks.build_task`).
      loss_floor: the lowest expected test loss any model can reach, where the generator
        makes it known (see `jtricks.data.generated`); ``None`` otherwise.
      mask_train, mask_test: 0/1 masks of the targets' shape (which positions count, for
        the tasks that read one: segmentation, language model), or ``None``.
      val: ``(x_val, y_val)``, a validation split the dataset brings (a long-tailed or
        noisy dataset's clean, balanced one: `jtricks.data.imbalance`), used instead
        of carving ``val_fraction`` out of the training split; ``None`` otherwise.
      classes: a classifier's class names, label ``i`` being ``classes[i]`` (an image
        folder's folder names, a table's or an array's text labels, in sorted order), or
        ``None``; a run records them, and its model's ``classes`` gives them back.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    task: str = "classification"
    loss_floor: float | None = None
    mask_train: np.ndarray | None = None
    mask_test: np.ndarray | None = None
    val: tuple[np.ndarray, np.ndarray] | None = None
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ConfigError(
                f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes",
                param="dataset",
            )
        if not 1 <= self.num_classes <= MAX_OUTPUTS:
            raise ConfigError(
                f"{self.name}: {self.num_classes} outputs (classes, targets or vocabulary; for "
                f"labels, the largest label + 1) is outside 1..{MAX_OUTPUTS:,} (2**20); "
                "labels must be 0..C-1 for C classes",
                param="dataset",
            )
        if self.task == "classification":
            validate_arrays(
                self.x_train, self.y_train, self.num_classes, where=f"{self.name} train split"
            )
            validate_arrays(
                self.x_test, self.y_test, self.num_classes, where=f"{self.name} test split"
            )
            if self.val is not None:
                validate_arrays(*self.val, self.num_classes, where=f"{self.name} validation split")
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if len(x) != len(y) or len(x) == 0:
                raise ConfigError(
                    f"{self.name} {split} split: {len(x)} inputs but {len(y)} targets"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ConfigError(
                f"{self.name}: train and test examples differ in shape: "
                f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )

    def digest(self) -> str:
        """`data_digest` of every array: both splits, the masks and the own validation
        split (a run records it in ``config.json``; ``--resume`` checks it). Computed once
        per dataset, which is frozen (`jtricks.data.in_memory` names arrays by it too)."""
        if "_digest" not in self.__dict__:
            masks = (self.mask_train, self.mask_test)
            arrays = (self.x_train, self.y_train, self.x_test, self.y_test, *masks)
            object.__setattr__(self, "_digest", data_digest(*arrays, *(self.val or ())))
        return self.__dict__["_digest"]


def data_digest(*arrays: Any) -> str:
    """SHA-256 over the arrays' dtypes, shapes and bytes (``None`` s skipped, their places
    kept): about 2 GB/s on a CPU core, 0.4 s for CIFAR-10's arrays."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def validate_arrays(x: Any, y: Any, num_classes: int | None, *, where: str) -> None:
    """Check features and labels before any training: shapes, finiteness, label range.

    Raises:
      ConfigError: naming ``where`` and what is wrong (NaN count, bad label, shape mismatch).
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2:
        raise ConfigError(
            f"{where}: features must have shape (N, ...) with N examples; got shape {x.shape}"
        )
    if y.ndim != 1:
        raise ConfigError(f"{where}: labels must have shape (N,); got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{where}: {x.shape[0]} examples but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ConfigError(f"{where}: no examples")
    if not np.issubdtype(x.dtype, np.number):
        raise ConfigError(f"{where}: features must be numeric; got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{where}: labels must be integers; got dtype {y.dtype}")
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ConfigError(
            f"{where}: features contain {int(bad.sum())} non-finite values (NaN or inf), "
            f"first at index {tuple(int(i) for i in first)}"
        )
    if num_classes is not None:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ConfigError(
                f"{where}: labels must lie in [0, {num_classes - 1}]; got values in [{lo}, {hi}]"
            )
