"""A user's own model by import path: ``--model mymodels:Net(features=(64, 64))``.

The path names a Linen module class, an NNX module class, or a function returning either;
the spec's literal arguments are passed to it, with two filled in when it takes them and
the spec leaves them out: ``num_classes`` (the dataset's) and, for NNX, ``rngs``
(``nnx.Rngs(seed)``, the run's seed, or a member's key). New here: the same ``module:factory(args)``
spec the optimizers take, checked before anything is written (see `jtricks.imports`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jtricks.errors import ConfigError
from jtricks.imports import accepts, call_user, resolve_path
from jtricks.spec import parse_spec


def is_import_path(spec: Any) -> bool:
    """Whether a model spec names user code (``module:factory``) rather than the registry."""
    return isinstance(spec, str) and ":" in spec.split("(", 1)[0]


def user_model(spec: str, num_classes: int, *, seed: int | jax.Array = 0) -> nn.Module | nnx.Module:
    """Build the model ``spec`` (``"module:factory(args)"``) names.

    Raises:
      ConfigError (``param="model"``): an import or a call that fails, or a result that
        is neither a Linen nor an NNX module.
    """
    name, args, kwargs = parse_spec(spec, what="model")
    factory = resolve_path(name, what="model")
    if accepts(factory, "num_classes"):
        kwargs.setdefault("num_classes", num_classes)
    if accepts(factory, "rngs"):
        kwargs.setdefault("rngs", nnx.Rngs(seed))
    model = call_user(factory, args, kwargs, what="model", name=name)
    if not isinstance(model, nn.Module | nnx.Module):
        raise ConfigError(
            f"model {name!r} returned {type(model).__name__}, not a Flax Linen or NNX module",
            param="model",
        )
    return model


__all__ = ["is_import_path", "user_model"]
