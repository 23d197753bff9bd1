"""Tasks: the loss, the exact split metrics and the data checks of what a model learns.

`fit`, `evaluate` and the compiled steps take ``task=`` (a `Task` or a spec string such
as ``"regression"`` or ``"segmentation(dice_weight=1.0)"``); see `jtricks.tasks.base`
for the protocol and how to write your own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jtricks.caches import cached
from jtricks.errors import ConfigError
from jtricks.losses import binary_cross_entropy, cross_entropy, mse
from jtricks.spec import build_from_registry
from jtricks.tasks.base import (
    WHOLE_BATCH,
    LossTask,
    Task,
    batch_sums,
    finalize,
    train_metrics,
)
from jtricks.tasks.classification import Classification, MultiLabel
from jtricks.tasks.dense import LanguageModel, Segmentation
from jtricks.tasks.regression import Regression

TASKS: dict[str, Callable[..., Task]] = {
    "classification": Classification,
    "multilabel": MultiLabel,
    "binary": MultiLabel,
    "regression": Regression,
    "segmentation": Segmentation,
    "lm": LanguageModel,
    "language_model": LanguageModel,
}


@cached(maxsize=256)
def build_task(spec: str) -> Task:
    """A registered task from a spec such as ``"classification(label_smoothing=0.1)"``
    (tasks are frozen: one object per spec, cached).

    Raises:
      ConfigError: unknown name (listing the valid ones) or a bad argument.
    """
    return build_from_registry(spec, TASKS, what="task")


def as_task(task: Task | str | None = None, loss_fn: Callable | None = None) -> Task:
    """The task a `fit` / `evaluate` call means.

    ``task`` wins (a `Task` or a spec string). Otherwise ``loss_fn`` decides: ``None`` or
    `jtricks.losses.cross_entropy` (also with ``label_smoothing`` bound by
    `functools.partial`) is classification, `jtricks.losses.mse` regression,
    `jtricks.losses.binary_cross_entropy` multi-label; any other function becomes a
    `LossTask` (per-example loss, optional extra metrics).
    """
    if task is not None:
        if loss_fn is not None:
            raise ConfigError("give task or loss_fn, not both", param="loss_fn")
        if isinstance(task, str):
            return build_task(task)
        if not isinstance(task, Task):
            raise ConfigError(
                f"task must be a jtricks.tasks.Task or a task name ({', '.join(TASKS)}); "
                f"got {task!r}",
                param="task",
            )
        return task
    return _task_of_loss(loss_fn)


@cached
def _task_of_loss(loss_fn: Callable | None) -> Task:
    if loss_fn is None or loss_fn is cross_entropy:
        return Classification()
    if isinstance(loss_fn, functools.partial) and loss_fn.func is cross_entropy:
        if not loss_fn.args and set(loss_fn.keywords) <= {"label_smoothing"}:
            return Classification(label_smoothing=loss_fn.keywords.get("label_smoothing", 0.0))
    if loss_fn is mse:
        return Regression()
    if loss_fn is binary_cross_entropy:
        return MultiLabel()
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable; got {loss_fn!r}", param="loss_fn")
    return LossTask(fn=loss_fn)


__all__: list[Any] = [
    "TASKS",
    "WHOLE_BATCH",
    "Classification",
    "LanguageModel",
    "LossTask",
    "MultiLabel",
    "Regression",
    "Segmentation",
    "Task",
    "as_task",
    "batch_sums",
    "build_task",
    "finalize",
    "train_metrics",
]
