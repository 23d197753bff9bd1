"""Calling a user's model: the train flag where its signature takes one, BatchNorm statistics.

`LinenApply` is what `create_train_state` stores as ``state.apply_fn`` for a Linen
module: ``apply_fn(variables, inputs, *, train, rngs=None, mutable=False)`` whatever
the module's own flag is called (``train``, ``training``, ``is_training``, or
``deterministic``, passed negated) or if it has none. It is a frozen dataclass, so two
states of equal modules share compiled programs. `apply_model` runs it inside a step.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax

from jtricks.errors import ConfigError
from jtricks.optim.fused import unflatten_params

TRAIN_ARGS = ("train", "training", "is_training", "deterministic")
AUTO = "auto"


def detect_train_arg(module: nn.Module) -> str | None:
    """The keyword of ``module.__call__`` that switches training mode, or ``None``."""
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in TRAIN_ARGS if name in params), None)


@dataclasses.dataclass(frozen=True)
class LinenApply:
    """``module.apply`` with the training flag passed as the module expects it.

    Attributes:
      module: the Linen module.
      train_arg: the keyword to pass (``deterministic`` gets ``not train``), or ``None``
        for a module without one.
    """

    module: nn.Module
    train_arg: str | None

    def _flag(self, train: bool | None) -> dict[str, bool]:
        if self.train_arg is None or train is None:
            return {}
        return {self.train_arg: (not train) if self.train_arg == "deterministic" else train}

    def __call__(
        self, variables, inputs, *, train: bool | None = None, rngs=None, mutable=False, **kwargs
    ):
        """``module.apply``; ``train=None`` leaves the module's own default, other keywords
        (e.g. ``capture_intermediates``) go to ``module.apply``."""
        return self.module.apply(
            variables, inputs, rngs=rngs, mutable=mutable, **self._flag(train), **kwargs
        )

    def init(self, key: jax.Array, inputs: Any) -> dict[str, Any]:
        """The module's variables, initialised in evaluation mode from ``key``."""
        return self.module.init({"params": key}, inputs, **self._flag(False))


def linen_apply(module: nn.Module, train_arg: str | None = AUTO) -> LinenApply:
    """Wrap ``module`` for `TrainState.apply_fn`; ``train_arg="auto"`` reads its signature."""
    if train_arg == AUTO:
        train_arg = detect_train_arg(module)
    elif train_arg is not None and not isinstance(train_arg, str):
        raise ConfigError(
            f"train_arg must be a keyword name, None or 'auto'; got {train_arg!r}",
            param="train_arg",
        )
    return LinenApply(module, train_arg)


def apply_model(
    state: Any, params: Any, inputs: Any, *, train: bool, key: jax.Array | None
) -> tuple[Any, Any]:
    """Run ``state``'s model on ``inputs``; returns ``(outputs, new_batch_stats)``.

    In training mode the ``batch_stats`` collection is mutable (its update is returned)
    and ``key`` is the ``dropout`` stream. `Flat` parameters (the fused optimizer's
    layout) are cut back into their tree here, inside the compiled step.
    """
    variables = {"params": unflatten_params(params)}
    rngs = {"dropout": key} if key is not None else None
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        if train:
            out, updates = state.apply_fn(
                variables, inputs, train=True, rngs=rngs, mutable=["batch_stats"]
            )
            return out, updates["batch_stats"]
    return state.apply_fn(variables, inputs, train=train, rngs=rngs), state.batch_stats
