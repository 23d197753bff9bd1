"""Per-class figures of a classifier on a split: its confusion matrix, and each class's
support, recall, precision and F1.

Built on `evaluate`'s machinery (any batch layout, streams, meshes, ensembles, the
``params`` source), with the classification task's confusion sums switched on, so the
matrix is exact over the whole split for any batch size. What is new here: scikit-learn's
``confusion_matrix`` and ``classification_report`` need every prediction on the host;
this sums on the device and brings back one ``C x C`` matrix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jtricks.errors import ConfigError
from jtricks.tasks import Classification, Task, as_task
from jtricks.tasks.classification import MAX_CLASS_STATS
from jtricks.training.fit import split_metrics
from jtricks.training.loop import record_value
from jtricks.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class ClassReport:
    """A split's confusion matrix ``confusion[i, j]``: examples of class ``i`` predicted
    as ``j`` (an ensemble's: its combined prediction's). Per class ``c``, with support
    ``n_c = sum_j confusion[c, j]``, predictions ``p_c = sum_i confusion[i, c]`` and
    hits ``t_c = confusion[c, c]``: recall ``t_c / n_c``, precision ``t_c / p_c`` and
    ``F1 = 2 t_c / (n_c + p_c)`` (0 where the denominator is 0, as scikit-learn's
    ``zero_division=0``)."""

    confusion: np.ndarray

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.support)

    @property
    def precision(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def f1(self) -> np.ndarray:
        return _ratio(2 * np.diag(self.confusion), self.support + self.confusion.sum(axis=0))

    def to_dict(self) -> dict[str, list]:
        """JSON-ready lists, one entry per class (the summary's ``per_class``)."""
        return {
            "support": self.support.tolist(),
            "recall": self.recall.tolist(),
            "precision": self.precision.tolist(),
            "f1": self.f1.tolist(),
        }


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a / np.maximum(b, 1), 0.0).astype(np.float64)


def class_report(
    state: TrainState,
    data: Any,
    *,
    task: Task | str | None = None,
    batch_size: int = 1000,
    params: str = "auto",
) -> ClassReport:
    """The `ClassReport` of ``state`` on ``data`` (what `jtricks.training.evaluate`
    takes) for a classification task with one label per example and at most
    `MAX_CLASS_STATS` classes.

    Raises:
      ConfigError: another task, or targets per position.
    """
    task = as_task(task)
    if not isinstance(task, Classification):
        raise ConfigError(
            f"class_report needs the classification task; got the {task.name} task",
            param="task",
        )
    _, report = evaluate_with_report(state, data, task=task, batch_size=batch_size, params=params)
    if report is None:
        raise ConfigError(
            "class_report needs one class label per example and logits (N, C) with C <= "
            f"{MAX_CLASS_STATS}",
            param="data",
        )
    return report


def evaluate_with_report(
    state: TrainState, data: Any, task: Task | str | None, batch_size: int, params: str
) -> tuple[dict[str, Any], ClassReport | None]:
    """`jtricks.training.evaluate`'s metrics and, in the same pass, the `ClassReport`
    where there is one (classification, one label per example, at most
    `MAX_CLASS_STATS` classes; else ``None``)."""
    task = as_task(task)
    if isinstance(task, Classification):
        task = dataclasses.replace(task, confusion=True)
    metrics = split_metrics(state, data, task, batch_size, params)
    confusion = metrics.pop("confusion", None)
    metrics.pop("member_confusion", None)
    report = None
    if confusion is not None:
        report = ClassReport(np.rint(np.asarray(confusion)).astype(np.int64))
    loss = float(metrics.pop("loss"))
    return {"loss": loss, **{k: record_value(k, v) for k, v in metrics.items()}}, report


def plot_confusion(
    report: ClassReport, path: Path, *, title: str = "test split", classes: Any = None
) -> None:
    """Save the confusion matrix, each row normalised by its support (so a row's
    diagonal cell is the class's recall), as a PNG, atomically; counts in the cells, and
    the ``classes``' names on the axes where given (past 24 characters cut, the figure
    grown by their length so that none is clipped)."""
    from jtricks.plotting import save_figure, subplots

    cm = report.confusion
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(cm)
    names = None if classes is None or k > 20 else [_shortened(str(c)) for c in classes]
    margin = 0.0 if names is None else 0.085 * max(map(len, names))  # 10-point characters
    fig, ax = subplots(figsize=(1.2 + 0.45 * k + margin, 1 + 0.4 * k + margin))
    image = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    if k <= 20:
        ax.set(xticks=range(k), yticks=range(k))
        if names is not None:
            ax.set_xticklabels(names, rotation=90)
            ax.set_yticklabels(names)
        for i, j in np.ndindex(cm.shape):
            colour = "white" if rows[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"confusion ({title})")
    save_figure(fig, path)


def _shortened(name: str, width: int = 24) -> str:
    """``name`` cut to ``width`` characters, the cut marked (the summary keeps it whole)."""
    return name if len(name) <= width else name[: width - 1] + "\u2026"
