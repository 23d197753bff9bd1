"""The update call every jtricks loop makes: ``tx.update`` with the extra arguments that
optax's `GradientTransformationExtraArgs` optimizers may read.

Plain `optax.GradientTransformation` s get ``update(grads, state, params)``, as always.
An extra-args transformation (every optimizer `build_optimizer` returns, and e.g.
`optax.lbfgs`, `optax.polyak_sgd`, `optax.contrib.momo`, `optax.contrib.sophia`) also
gets the keywords those optimizers name:

* ``value``: the loss of this step (Polyak SGD, Momo, L-BFGS's line search);
* ``grad``: the gradient again (L-BFGS's zoom line search);
* ``value_fn``: ``params -> loss`` on the same batch with the same randomness (L-BFGS's
  line search; `build_optimizer` hands it to `optax.contrib.sophia` under the name that
  one reads, ``obj_fn``);
* ``grad_fn``: ``(params, i) -> gradient`` of that loss, to an update that names it
  (`optax.contrib.sam` with ``opaque_mode=True``: its adversarial steps).

Transformations that do not read them ignore them (optax's chains pass keywords on; XLA
drops an unused ``value_fn``); an update whose signature names its keywords and takes no
``**kwargs`` (`optax.contrib.sam`'s) gets only those. No other name is passed: optax's
zoom line search refuses keywords its ``value_fn`` does not take. New here: one call site
for the contract, shared by `fit`, the fused path and ``jtricks bench``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax


def update(
    tx: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    value: Any = None,
    value_fn: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any]:
    """``tx.update(grads, opt_state, params, **extra)``: see the module docstring."""
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        return tx.update(grads, opt_state, params)
    extra: dict[str, Any] = {"grad": grads}
    if value is not None:
        extra["value"] = value
    if value_fn is not None:
        extra["value_fn"] = value_fn
    named = _keywords(tx.update)
    if named is None:  # **extra_args: every keyword above
        return tx.update(grads, opt_state, params, **extra)
    if value_fn is not None and "grad_fn" in named:
        extra["grad_fn"] = lambda p, i: jax.grad(value_fn)(p)
    extra = {k: v for k, v in extra.items() if k in named}
    return tx.update(grads, opt_state, params, **extra)


def _keywords(update: Callable) -> frozenset[str] | None:
    """The keywords ``update`` names; ``None`` when it takes any (``**extra_args``)."""
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
