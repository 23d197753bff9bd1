"""`initial_loss`: at initialisation the cross-entropy should be about ``log C``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jtricks.errors import check_int
from jtricks.losses import cross_entropy
from jtricks.training.model import apply_model
from jtricks.training.state import TrainState
from jtricks.training.steps import LossFn


@dataclass
class InitialLossReport:
    """`initial_loss`'s result: the measured loss, ``log C``, their ratio and the verdict."""

    loss: float
    expected: float
    ratio: float
    tolerance: float
    passed: bool


def initial_loss(
    state: TrainState,
    x: Any,
    y: Any,
    *,
    num_classes: int,
    loss_fn: LossFn = cross_entropy,
    tolerance: float = 0.25,
) -> InitialLossReport:
    """Cross-entropy at initialisation (evaluation mode) against ``log C``.

    A freshly initialised classifier should predict nearly uniform probabilities, so the
    loss should be about ``log C`` (2.303 for 10 classes). Passes when
    ``|loss / log C - 1| <= tolerance``. Much larger means over-confident initial logits
    (too large a last-layer initialisation, an unscaled input), much smaller a label leak.
    """
    check_int("num_classes", num_classes, low=2)
    logits, _ = apply_model(state, state.params, jnp.asarray(x), train=False, key=None)
    loss = float(jnp.mean(loss_fn(logits, jnp.asarray(y))))
    expected = math.log(num_classes)
    ratio = loss / expected
    return InitialLossReport(loss, expected, ratio, tolerance, bool(abs(ratio - 1) <= tolerance))
