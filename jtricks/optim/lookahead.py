"""Lookahead: an inner optimizer explores ``k`` fast steps, the slow weights then move part of
the way to where it went.

    theta_{t+1} = theta_t + u_t                       (u_t: the inner optimizer's update)
    every k-th step:  phi <- phi + alpha (theta_{t+1} - phi) ;  theta_{t+1} <- phi

with ``phi_0 = theta_0``. The inner optimizer's state carries on across the resets (as in
`optax.lookahead` by default). ``k = 5, alpha = 0.5`` are the defaults here, as in PyTorch's
``torch-optimizer``; ``alpha = 1`` is the inner optimizer itself.

New here: `optax.lookahead` keeps ``phi`` in the *parameters* (``LookaheadParams(fast,
slow)``), which a model cannot apply, so it does not train in `fit`, checkpoints or
transfer learning; here ``phi`` lives in the optimizer state and the update moves the
model's own parameters, so lookahead wraps any optimizer (``"adam | lookahead"`` in a
spec, `optax`'s and a user's) and chains like any transformation. The slow weights are
the optimizer's evaluation parameters (`jtricks.optim.eval_params`), as optax advises
for its own: ``--eval-params train`` evaluates the fast ones.

References:
  Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back" (2019),
  https://arxiv.org/abs/1907.08610
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtricks.errors import ConfigError, check_int, check_range
from jtricks.optim import contract
from jtricks.optim.eval_params import register_eval_params


class LookaheadState(NamedTuple):
    """``inner``: the inner optimizer's state; ``slow``: ``phi``, a tree like the
    parameters; ``count``: the fast steps taken (int32)."""

    inner: Any
    slow: Any
    count: jax.Array


def lookahead(
    inner: optax.GradientTransformation, sync_period: int = 5, alpha: float = 0.5
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` in Lookahead (module docstring: the rule and what is new).

    Args:
      inner: any optax transformation (its extra update arguments are passed on, see
        `jtricks.optim.contract`).
      sync_period: ``k >= 1``, fast steps between two moves of the slow weights.
      alpha: ``0 < alpha <= 1``, the slow weights' step toward the fast ones.

    Returns:
      A transformation whose ``update`` needs ``params``; at a sync step its update is
      ``phi_new - theta_t``, so ``optax.apply_updates`` lands on ``phi_new``.

    Example:
      >>> tx = lookahead(optax.adam(1e-3), sync_period=5, alpha=0.5)
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise ConfigError(
            f"inner must be an optax GradientTransformation (e.g. optax.adam(1e-3)); got {inner!r}",
            param="inner",
        )
    check_int("sync_period", sync_period, low=1)
    check_range("alpha", alpha, low=0.0, high=1.0, low_inclusive=False)

    def init_fn(params: Any) -> LookaheadState:
        slow = jax.tree.map(jnp.copy, params)
        return LookaheadState(inner.init(params), slow, jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("lookahead needs the parameters: update(updates, state, params)")
        value, value_fn = extra.get("value"), extra.get("value_fn")
        fast, inner_state = contract.update(
            inner, updates, state.inner, params, value=value, value_fn=value_fn
        )
        count = state.count + 1
        sync = count % sync_period == 0
        theta = jax.tree.map(lambda p, u: p + u, params, fast)
        slow = jax.tree.map(lambda s, t: jnp.where(sync, s + alpha * (t - s), s), state.slow, theta)
        out = jax.tree.map(lambda u, s, p: jnp.where(sync, s - p, u), fast, slow, params)
        return out, LookaheadState(inner_state, slow, count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def refuse_optax_lookahead(opt_state: Any) -> None:
    """Raise a `ConfigError` when ``opt_state`` holds `optax.lookahead`'s state, whose
    update would fail on the model's parameters with an ``AttributeError``."""
    is_optax = lambda x: isinstance(x, optax.LookaheadState)  # noqa: E731
    if any(is_optax(n) for n in jax.tree.leaves(opt_state, is_leaf=is_optax)):
        raise ConfigError(
            "optax.lookahead keeps its slow weights in the parameters (optax.LookaheadParams), "
            "which the model cannot apply; use jtricks.optim.lookahead(tx, sync_period, alpha) "
            "or the spec stage '... | lookahead(sync_period, alpha)', which keep them in the "
            "optimizer state",
            param="optimizer",
        )


register_eval_params(LookaheadState, lambda node, params: node.slow)
