"""`initial_loss`: at initialisation the loss should be that of an all-zero output
(``log C`` for a classifier)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jtricks.diagnostics.common import diagnostic_batch
from jtricks.errors import ConfigError, check_int
from jtricks.tasks import Task
from jtricks.training.gradients import objective
from jtricks.training.model import apply_model
from jtricks.training.state import TrainState


@dataclass
class InitialLossReport:
    """`initial_loss`'s result: the measured loss, the expected one (an all-zero
    output's: ``log C`` for a classifier), their ratio and the verdict."""

    loss: float
    expected: float
    ratio: float
    tolerance: float
    passed: bool


def initial_loss(
    state: TrainState,
    x: Any,
    y: Any = None,
    *,
    task: Task | str | None = None,
    loss_fn: Callable | None = None,
    num_classes: int | None = None,
    tolerance: float = 0.25,
) -> InitialLossReport:
    """The loss at initialisation (evaluation mode) against that of an all-zero output.

    A well-initialised network's outputs start near zero, so its loss should be about
    ``L(0)``, the task's loss of zero outputs on the same batch: ``log C`` for a
    classifier (uniform probabilities; 2.303 for 10 classes), ``log V`` per token for a
    language model, ``log 2`` per label for multi-label, ``mean(y^2)`` for the mean
    squared error. Passes when ``|L / L(0) - 1| <= tolerance``. Much larger means
    over-confident or over-scaled initial outputs (too large a last-layer
    initialisation, an unscaled input), much smaller a label leak (Karpathy 2019).

    ``x, y`` is a batch (or ``x`` any batch pytree with ``y=None``); the loss is
    ``task``'s or ``loss_fn``'s, as in `fit` (neither: classification). ``num_classes``,
    when given, must be the model's number of outputs.
    """
    task, batch = diagnostic_batch(x, y, task, loss_fn)
    outputs, _ = apply_model(state, state.params, task.inputs(batch), train=False, key=None)
    if num_classes is not None and check_int("num_classes", num_classes, low=2) != (
        width := outputs.shape[-1]
    ):
        raise ConfigError(
            f"num_classes={num_classes} but the model gives {width} outputs per example",
            param="num_classes",
        )
    loss = float(objective(task, outputs, batch, None))
    expected = float(objective(task, jnp.zeros_like(outputs), batch, None))
    ratio = loss / expected
    return InitialLossReport(loss, expected, ratio, tolerance, bool(abs(ratio - 1) <= tolerance))
