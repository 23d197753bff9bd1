"""Optimizers from outside jtricks' registry, by name: optax's, optax.contrib's and a user's.

A spec stage may name

* ``optax.<name>`` (``"optax.lion(b1=0.95)"``, ``"optax.nadamw"``, ``"optax.lbfgs"``);
* ``contrib.<name>`` or ``optax.contrib.<name>`` (``"contrib.muon"``,
  ``"contrib.schedule_free_adamw(warmup_steps=100)"``, ``"contrib.prodigy"``);
* an import path ``module:factory`` (``"mypkg.opt:make(beta=0.9)"``), importing ``module``
  (from the working directory too, as ``python -m`` does).

The factory is called with the learning rate (as ``learning_rate=`` when it has such a
parameter, else as its first argument: ``max_learning_rate`` for `optax.polyak_sgd`)
and the spec's own arguments (``lr=`` is the learning rate), and must return an
`optax.GradientTransformation`. New here: names resolved and checked before any
training, with the close matches of a misspelt name, so that any optimizer of the
ecosystem enters `build_optimizer`, the CLI and ``jtricks bench`` like jtricks' own.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import optax

from jtricks.errors import ConfigError, did_you_mean
from jtricks.imports import import_module, public_callables

PREFIXES = {"optax.contrib.": "optax.contrib", "contrib.": "optax.contrib", "optax.": "optax"}


def is_external(name: str) -> bool:
    """Does ``name`` point outside jtricks' registry (optax, optax.contrib, an import path)?"""
    return ":" in name or any(name.startswith(p) for p in PREFIXES)


def _factories(module: Any) -> list[str]:
    return public_callables(module)


def _close(name: str, candidates: list[str]) -> str:
    return did_you_mean(name, candidates)


def prefixed_hint(name: str) -> str:
    """`` (did you mean 'optax.lion'?)`` when a bare name is an optimizer factory of optax
    or optax.contrib (which jtricks reaches only with the prefix), else ``""``."""
    for prefix, module_name in (("optax.", "optax"), ("contrib.", "optax.contrib")):
        factory = getattr(importlib.import_module(module_name), name, None)
        if callable(factory) and not isinstance(factory, type):
            return f" (did you mean {prefix + name!r}? {module_name}'s optimizers take its prefix)"
    return ""


def resolve(name: str) -> Callable[..., Any]:
    """The factory a name points to.

    Raises:
      ConfigError (``param="optimizer"``): a module that cannot be imported, a missing or
        non-callable attribute; the message lists close matches.
    """
    if ":" in name:
        module_name, attr = name.split(":", 1)
        module = import_module(module_name, what="optimizer", spec=name)
        shown = module_name
    else:
        prefix = next(p for p in PREFIXES if name.startswith(p))
        module = importlib.import_module(PREFIXES[prefix])
        attr, shown = name[len(prefix) :], PREFIXES[prefix]
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory) or isinstance(factory, type):
        what = "has no optimizer factory" if factory is None else "is not an optimizer factory:"
        raise ConfigError(
            f"unknown optimizer {name!r}: {shown} {what} {attr!r}"
            + _close(attr, _factories(module)),
            param="optimizer",
        )
    if ":" not in name:
        _check_takes_rate(factory, name)
    return factory


RATE_FIRST = ("learning_rate", "max_learning_rate")
"""First parameters of optax factories that take the rate (`optax.polyak_sgd`'s cap)."""


def _check_takes_rate(factory: Callable[..., Any], name: str) -> None:
    """A `ConfigError` for an optax or optax.contrib callable that takes no learning rate
    (a transform, a schedule, a loss: ``optax.scale_by_adam`` would get the rate as its
    ``b1``, ``contrib.reduce_on_plateau`` as its ``factor``, and ``optax.scale`` would
    climb the gradient)."""
    try:
        params = list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return  # no signature to read: the call decides
    if "learning_rate" in params or (params[0] if params else None) in RATE_FIRST:
        return
    hint = "; for a rate cut on a plateau use --schedule plateau(...) (fit: ReduceLROnPlateau)"
    raise ConfigError(
        f"{name!r} is not an optimizer that takes a learning rate (its parameters: "
        f"{', '.join(params) or 'none'}); a transform or a wrapper goes into a factory of "
        "your own, module:factory(learning_rate, ...) returning the chain"
        + (hint if name.endswith("reduce_on_plateau") else ""),
        param="optimizer",
    )


def takes_learning_rate_keyword(factory: Callable[..., Any]) -> bool:
    try:
        return "learning_rate" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def check_transformation(tx: Any, name: str) -> optax.GradientTransformation:
    """``tx`` itself if it is an `optax.GradientTransformation` (the objective function
    renamed for the ones that read it as ``obj_fn``), else a `ConfigError`."""
    if not isinstance(tx, optax.GradientTransformation):
        raise ConfigError(
            f"optimizer {name!r} returned {type(tx).__name__}, not an optax "
            "GradientTransformation (an (init, update) pair)",
            param="optimizer",
        )
    return obj_fn_alias(tx) if name.split(".")[-1].split(":")[-1] in OBJ_FN_READERS else tx


OBJ_FN_READERS = ("sophia",)  # optimizers that read the objective as ``obj_fn``


def obj_fn_alias(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` receiving the ``value_fn`` extra argument also as ``obj_fn`` (the name
    `optax.contrib.sophia`'s Hessian estimator reads)."""

    def update(updates, state, params=None, **extra):
        if "value_fn" in extra:
            extra["obj_fn"] = extra.pop("value_fn")
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)
