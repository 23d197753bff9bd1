"""Optimizers by name, as optax `GradientTransformation`s.

For now the registry maps names onto optax's own optimizers; every entry takes
the learning rate first. A spec may override keyword arguments, e.g.
``"adam(b1=0.8)"`` or ``"momentum(momentum=0.95, nesterov=True)"``.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from jtricks.errors import check_range
from jtricks.spec import build_from_registry


def momentum(
    learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *, nesterov: bool = False
) -> optax.GradientTransformation:
    """Heavy-ball SGD, ``v <- gamma v + g ; w <- w - eta v`` (optax.sgd with momentum)."""
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": momentum,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
}


def build_optimizer(
    spec: str, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Build a registered optimizer from a spec such as ``"adam"`` or ``"adam(b1=0.8)"``.

    Raises:
      ConfigError: for an unknown name (listing the valid ones), a bad argument,
        or a non-positive float learning rate.
    """
    if not callable(learning_rate):
        check_range("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    return build_from_registry(spec, OPTIMIZERS, what="optimizer", leading=(learning_rate,))


__all__ = ["OPTIMIZERS", "build_optimizer", "momentum"]
