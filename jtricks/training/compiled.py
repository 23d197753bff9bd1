"""The step programs `fit` and `evaluate` share, built once per task and options.

Both functions are cached: every `fit` call with the same task and options reuses the
same step functions, so JAX's own jit cache compiles each epoch or chunk program once per
model, optimizer and shapes.
"""

from __future__ import annotations

import functools
from typing import Any

from jtricks.errors import ConfigError
from jtricks.tasks import Classification, LossTask, Task
from jtricks.training.steps import make_epoch_fn, make_eval_step, make_evaluate_fn, make_train_step

_CLASSIFICATION = Classification()


@functools.cache
def compiled_steps(
    task: Task = _CLASSIFICATION,
    norms: bool = True,
    update_norm: bool = False,
    augment: Any = None,
    mix: tuple | None = None,
    accumulate: int = 1,
    precision: str = "float32",
    num_classes: int | None = None,
):
    """The ``(train_step, eval_step)`` pair of a task and options; cached, so the programs
    compiled from them (epochs, stream chunks) are shared by every `fit` call."""
    options = dict(norms=norms, update_norm=update_norm, augment=augment, mix=mix)
    options["num_classes"] = num_classes
    train_step = make_train_step(task=task, accumulate=accumulate, precision=precision, **options)
    return train_step, make_eval_step(task=task)


@functools.cache
def compiled_functions(steps: tuple = (), sharding: Any = None, eval_source: str = "auto"):
    """The jitted ``(run_epoch, evaluate)`` pair for `compiled_steps` ``(*steps)``; cached
    so repeated `fit` calls with the same task, options, model and optimizer compile once."""
    train_step, eval_step = compiled_steps(*steps)
    run_epoch = make_epoch_fn(train_step, eval_step, sharding, eval_source)
    return run_epoch, make_evaluate_fn(eval_step)


def check_options(task: Task, data: Any, augment: Any, mix: Any) -> None:
    """Refuse combinations of a task and a trick that cannot make sense."""
    if mix is not None and not isinstance(task, Classification | LossTask):
        raise ConfigError(
            f"mixup/cutmix mixes class labels; the {task.name} task has none", param="mix"
        )
    if augment is not None and not hasattr(task.inputs(data), "shape"):
        raise ConfigError(
            f"augment transforms one input array; the {task.name} task's model reads a "
            "structure of arrays",
            param="augment",
        )
