"""Optimizers that compare equal by what they compute, so a sweep compiles once.

A `TrainState` carries its optimizer as a static field, and JAX keys a compiled program
by its arguments' static parts. Two ``optax.adam(lr)`` objects are different closures, so
a learning-rate sweep that builds a new optimizer per rate traces and compiles every
program again (2-3 s per rate for a small MLP on a CPU), although only a number changed.

What is new here: with `optax.inject_hyperparams` the numeric hyper-parameters live in the
optimizer *state*, and the update reads them from there; it no longer depends on the values
the closure was built with. `Keyed` gives such a transformation an equality of its own,
the factory and the arguments that are *not* injected, so JAX's caches (and jtricks'
`fit`) treat the optimizers of a sweep as one: the first rate compiles, the others reuse
the program with their rate in the state.

* `sweepable` (``sweepable(optax.adam)(learning_rate=lr)``) does it for any optax factory;
* `jtricks.optim.build_optimizer` does it for every spec with a numeric learning rate.

A schedule (a callable rate) stays part of the key: the program evaluates that very
function, so a new schedule object compiles again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jtricks.errors import ConfigError


class Keyed(optax.GradientTransformationExtraArgs):
    """An optax transformation with a ``key``: two are equal, and hash equal, when their
    keys are. Use only when equal keys mean equal updates for equal states (as for the
    injected hyper-parameters of `sweepable`)."""

    def __new__(cls, tx: optax.GradientTransformation, key: Any) -> Keyed:
        self = super().__new__(cls, tx.init, optax.with_extra_args_support(tx).update)
        self.key = key
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyed) or not hasattr(self, "key"):
            return self is other
        return getattr(other, "key", None) == self.key

    def __hash__(self) -> int:
        return hash(self.key) if hasattr(self, "key") else id(self)


class _Identity:
    """A value compared by identity (functions, arrays, unhashable structures)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def freeze(value: Any) -> Any:
    """A hashable stand-in for a spec value: strings, numbers and None as they are,
    lists, tuples and dicts element by element, anything else by identity."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return (type(value).__name__, *map(freeze, value))
    if isinstance(value, dict):
        return ("dict", *sorted((str(k), freeze(v)) for k, v in value.items()))
    return _Identity(value)


def is_injected(value: Any) -> bool:
    """Whether `optax.inject_hyperparams` puts ``value`` in the state (a number or an
    array, not a bool); the key leaves exactly these out."""
    return not isinstance(value, bool) and isinstance(value, int | float | jax.Array | np.ndarray)


def sweepable(
    factory: Callable[..., optax.GradientTransformation],
    hyperparams: tuple[str, ...] = ("learning_rate",),
) -> Callable[..., Keyed]:
    """``factory`` with the numeric ``hyperparams`` in the optimizer state, and optimizers
    that differ only in those numbers equal: a sweep over them compiles once.

    ``sweepable(f)(**kw)`` is ``optax.inject_hyperparams(f, static_args=<the others>)(**kw)``
    wrapped in `Keyed` with key ``(f, the arguments not injected)``. Only the named
    hyper-parameters are traced, so the update is the factory's own arithmetic, bit for
    bit (a traced ``b1`` would round ``1 - b1`` in float32 where the closure folds it in
    float64). A schedule given for a named one is not injected but kept, by identity.

    Example:
      >>> adam = sweepable(optax.adam)
      >>> adam(learning_rate=1e-3) == adam(learning_rate=3e-3)
      True
    """
    signature = inspect.signature(factory)
    unknown = sorted(set(hyperparams) - set(signature.parameters))
    if unknown:
        raise ConfigError(
            f"hyperparams {unknown} are not parameters of {factory.__name__}; it takes: "
            f"{', '.join(signature.parameters)}",
            param="hyperparams",
        )
    static = tuple(name for name in signature.parameters if name not in hyperparams)
    injected = optax.inject_hyperparams(factory, static_args=static)

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Keyed:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"{factory.__name__}: {e}; it takes: {', '.join(signature.parameters)}",
                param="optimizer",
            ) from None
        bound.apply_defaults()
        kept = tuple(
            (name, freeze(value))
            for name, value in bound.arguments.items()
            if name in static or not is_injected(value)
        )
        return Keyed(injected(*args, **kwargs), ("sweepable", _Identity(factory), kept))

    return make


__all__ = ["Keyed", "freeze", "is_injected", "sweepable"]
