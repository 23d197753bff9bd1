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
  one reads, ``obj_fn``).

Transformations that do not read them ignore them (optax's chains pass keywords on; XLA
drops an unused ``value_fn``). No other name is passed: optax's zoom line search refuses
keywords its ``value_fn`` does not take. New here: one call site for the contract, shared by
`fit`, the fused path and ``jtricks bench``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    return tx.update(grads, opt_state, params, **extra)
