"""The step programs `fit` and `evaluate` share, built once per task and options.

`StepOptions` is everything the compiled programs of a run depend on besides the model,
the optimizer and the shapes: one frozen, hashable object, the key of the caches below.
Every `fit` call with equal options reuses the same step functions, so JAX's own jit
cache compiles each epoch or chunk program once per model, optimizer and shapes.
`clear_caches` forgets them all (e.g. between the studies of a long benchmark, or to
free the memory of programs a notebook no longer needs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jtricks.caches import cached, clear_caches
from jtricks.errors import ConfigError, check_int
from jtricks.tasks import Classification, LossTask, Task
from jtricks.training.epoch import StepLog, make_epoch_fn
from jtricks.training.steps import make_eval_step, make_evaluate_fn, make_train_step

_CLASSIFICATION = Classification()


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a run's compiled programs depend on (besides model, optimizer and shapes).

    Fields: the ``task``; ``norms`` / ``update_norm`` (the step's logged norms, see
    `make_train_step`); ``augment`` (per-example augmentation) and ``mix`` (``(kind,
    alpha)`` of mixup / cutmix, with the model's ``num_classes``); ``accumulate``
    (micro-batches per update); ``precision`` (``"float32"`` or ``"bf16"``);
    ``eval_source`` (which parameters validation evaluates); ``sharding`` (the batches'
    data-parallel `jax.sharding.NamedSharding`, or ``None``); ``unroll`` (steps per
    iteration of the compiled loop, `lax.scan`'s ``unroll``); ``log_every`` (keep the
    records of every ``log_every``-th step, `jtricks.training.epoch.StepLog`, or
    ``None``).
    """

    task: Task = _CLASSIFICATION
    norms: bool = True
    update_norm: bool = False
    augment: Any = None
    mix: tuple[str, float] | None = None
    accumulate: int = 1
    precision: str = "float32"
    num_classes: int | None = None
    eval_source: str = "auto"
    sharding: Any = None
    unroll: int = 1
    log_every: int | None = None

    def __post_init__(self) -> None:
        check_int("accumulate", self.accumulate, low=1)
        check_int("unroll", self.unroll, low=1)
        if self.log_every is not None:
            check_int("log_every_steps", self.log_every, low=1)

    @property
    def step_log(self) -> StepLog | None:
        """What the compiled loops record per step: every ``log_every``-th step's metrics,
        the update and parameter norms among them (kept out of the epoch means unless
        ``update_norm`` asked for them there)."""
        if self.log_every is None:
            return None
        private = () if self.update_norm else ("update_norm", "param_norm")
        return StepLog(self.log_every, private)


@cached
def compiled_steps(options: StepOptions = StepOptions()):
    """The ``(train_step, eval_step)`` pair of a run's options; cached, so the programs
    compiled from them (epochs, stream chunks) are shared by every `fit` call."""
    train_step = make_train_step(
        task=options.task,
        norms=options.norms,
        update_norm=options.update_norm or options.log_every is not None,
        augment=options.augment,
        mix=options.mix,
        num_classes=options.num_classes,
        accumulate=options.accumulate,
        precision=options.precision,
    )
    return train_step, make_eval_step(task=options.task)


@cached
def compiled_functions(options: StepOptions = StepOptions()):
    """The jitted ``(run_epoch, evaluate)`` pair of `compiled_steps` ``(options)``; cached
    so repeated `fit` calls with the same options, model and optimizer compile once."""
    train_step, eval_step = compiled_steps(options)
    run_epoch = make_epoch_fn(
        train_step,
        eval_step,
        options.sharding,
        options.eval_source,
        options.unroll,
        options.step_log,
    )
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


__all__ = ["StepOptions", "clear_caches", "compiled_functions", "compiled_steps"]
