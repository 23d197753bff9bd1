"""Checks of the arguments that are not data at the public entry points (`fit`,
`create_train_state`): the model, the optimizer, PRNG keys and `fit`'s hooks (data are
`jtricks.training.data_checks`').

Each failure is a `ConfigError` that names the argument, what it got and what is
allowed, raised before anything is initialised or trained: without them a plain
integer key failed inside JAX's PRNG code, and a callback without ``on_epoch_end``
only after the first epoch had trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from jtricks.errors import ConfigError


def described(value: Any) -> str:
    """``value`` in an error message: an array by its shape and dtype, else its type (and
    its repr when short)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    kind = type(value).__name__
    return f"{kind} {text}" if len(text) <= 40 and not callable(value) else kind


def check_key(name: str, key: Any) -> jax.Array:
    """``key`` if it is one PRNG key: a typed key (``jax.random.key(seed)``, shape ``()``)
    or a raw ``uint32`` key (``jax.random.PRNGKey(seed)``)."""
    if isinstance(key, jax.Array | np.ndarray):
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        if (typed and key.shape == ()) or (not typed and key.dtype == np.uint32 and key.ndim == 1):
            return key
    raise ConfigError(
        f"{name} must be one PRNG key, e.g. jax.random.key(0) (or jax.random.PRNGKey(0)); "
        f"got {described(key)}",
        param=name,
    )


def check_model(model: Any) -> None:
    """A Linen module or an initialised NNX module."""
    if not isinstance(model, nn.Module | nnx.Module):
        raise ConfigError(
            "model must be a Flax Linen module (e.g. jtricks.nn.MLP(10)) or an initialised "
            f"Flax NNX module; got {described(model)}",
            param="model",
        )


def optimizer_of(tx: Any) -> optax.GradientTransformation:
    """``tx`` as an optax transformation: one as it is, a spec string built by
    `jtricks.optim.build_optimizer` (``"adamw(lr=1e-3, weight_decay=0.01)"``)."""
    if isinstance(tx, str):
        from jtricks.optim import build_optimizer

        return build_optimizer(tx)
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return tx
    raise ConfigError(
        "tx must be an optax GradientTransformation (e.g. optax.adam(1e-3)) or an optimizer "
        f"spec such as 'adam(lr=1e-3)'; got {described(tx)}",
        param="tx",
    )


def checked_hooks(callbacks: Any, reporter: Any, stop: Any) -> tuple[Any, ...]:
    """`fit`'s ``callbacks``, ``reporter`` and ``stop`` checked; the callbacks as a tuple."""
    check_reporter(reporter)
    check_stop(stop)
    return checked_callbacks(callbacks)


def checked_callbacks(callbacks: Any) -> tuple[Any, ...]:
    """``callbacks`` (any iterable of them) as a tuple, each with a callable
    ``on_epoch_end`` (`Callback`)."""
    alone = hasattr(callbacks, "on_epoch_end") or isinstance(callbacks, str | bytes | Mapping)
    if alone or not isinstance(callbacks, Iterable):
        raise ConfigError(
            f"callbacks must be a list of callbacks; got {described(callbacks)} (one "
            "callback: callbacks=[cb])",
            param="callbacks",
        )
    callbacks = tuple(callbacks)
    for i, cb in enumerate(callbacks):
        if not callable(getattr(cb, "on_epoch_end", None)):
            raise ConfigError(
                f"callbacks[{i}] must have an on_epoch_end(record, state) method "
                f"(jtricks.training.Callback); got {described(cb)}",
                param="callbacks",
            )
    return callbacks


def check_reporter(reporter: Any) -> None:
    """``None`` or an object with ``start``, ``epoch_end`` and ``close`` methods
    (`jtricks.training.progress.RichReporter`)."""
    missing = [m for m in ("start", "epoch_end", "close") if not callable(getattr(reporter, m, 0))]
    if reporter is not None and missing:
        raise ConfigError(
            f"reporter must be a progress reporter (start, epoch_end and close methods, as "
            f"jtricks.training.progress.RichReporter has); got {described(reporter)}, "
            f"without {', '.join(missing)}",
            param="reporter",
        )


def check_stop(stop: Any) -> None:
    """``None``, an object with ``is_set()`` (a `threading.Event`, `StopSignals`) or a
    callable returning a bool."""
    if stop is not None and not callable(getattr(stop, "is_set", None)) and not callable(stop):
        raise ConfigError(
            "stop must be None, a flag with is_set() (threading.Event, "
            f"jtricks.training.preemption.StopSignals) or a function; got {described(stop)}",
            param="stop",
        )
