"""A `TrainState` whose optimizer is `jtricks.optim.fused`, with its parameters flat.

The train step keeps the parameters as the fused optimizer's flat buffers inside its
compiled loop (one buffer per group, no per-leaf arrays), and turns them back into
trees at the loop's end. The optimizer layer (`jtricks.optim.fused`) knows only optax;
this module is where a training state meets it.
"""

from __future__ import annotations

from typing import Any

from jtricks.optim.fused import flatten_params, is_fused, unflatten_params


def flat_train_state(state: Any) -> Any:
    """``state`` (a `TrainState` whose optimizer is `fused`) with ``params`` and
    ``ema_params`` as `Flat`, laid out as the optimizer's ``init`` saw them."""
    if not is_fused(state.opt_state):
        return state
    group_by = state.opt_state.group_by
    params = flatten_params(state.params, group_by=group_by)
    ema = state.ema_params
    if ema is not None:
        ema = params.layout.flatten(ema)
    return state.replace(params=params, ema_params=ema)


def tree_train_state(state: Any) -> Any:
    """Inverse of `flat_train_state`: the parameters (and EMA) back in tree form."""
    ema = state.ema_params
    return state.replace(
        params=unflatten_params(state.params),
        ema_params=None if ema is None else unflatten_params(ema),
    )
