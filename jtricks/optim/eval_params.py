"""Evaluation parameters declared by the optimizer state (schedule-free and your own).

Some optimizers train one sequence of parameters and should be *evaluated* on another.
Schedule-free methods (Defazio et al. 2024) take gradients at the interpolation
``y_t = (1 - b1) z_t + b1 x_t`` that optax returns as the parameters, while the iterate
meant for evaluation is the average ``x_t``, recovered from the state by
``x = (y - (1 - b1) z) / b1`` (`optax.contrib.schedule_free_eval_params`).

A *rule* maps one node of an optimizer state (found anywhere in the state's tree, so
inside `optax.chain`, `optax.inject_hyperparams`, `optax.masked` /
`optax.multi_transform` groups and `jtricks.optim.fused`) and the training parameters
to the evaluation parameters. `optax.contrib.ScheduleFreeState` is registered here with
optax's own helper; `register_eval_params` adds a rule for any other state type.

New here (optax has the helper, but nothing that finds the state inside a chain, a
parameter group or a fused buffer): `optimizer_eval_params`, which `fit`, `evaluate`,
TTA, ensembles and the CLI use through ``TrainState.evaluation_state``.

References:
  Defazio et al., "The Road Less Scheduled" (2024), https://arxiv.org/abs/2405.15682
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from optax.contrib import ScheduleFreeState, schedule_free_eval_params

from jtricks.errors import ConfigError
from jtricks.optim.fused import flatten_params, is_fused, unflatten_params

EvalRule = Callable[[Any, Any], Any]
"""``rule(state_node, params) -> eval_params``, both trees of the parameters' structure."""

_RULES: dict[type, EvalRule] = {}


def register_eval_params(state_type: type, rule: EvalRule) -> None:
    """Declare that optimizer states of ``state_type`` evaluate on ``rule(node, params)``.

    ``node`` is the state of that type as found in the optimizer state, ``params`` the
    training parameters (of the same structure as the node's parameter-shaped fields;
    leaves outside a parameter group are handled for you). Registering a type again
    replaces its rule.
    """
    if not isinstance(state_type, type):
        raise TypeError(f"state_type must be a class; got {state_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable (node, params) -> params; got {rule!r}")
    _RULES[state_type] = rule


def optimizer_eval_params(opt_state: Any, params: Any) -> Any:
    """The evaluation parameters the optimizer state declares, or ``params`` if none does.

    Leaves of ``params`` outside the declaring state's parameter group (an `optax.masked`
    or `optax.multi_transform` group) keep their training values; several declaring
    nodes in disjoint groups (Lookahead in two groups) each map their own leaves.

    Raises:
      ConfigError: when two declaring nodes cover one leaf (Lookahead around
        schedule-free, or two of them over the same parameters): their evaluation
        parameters would conflict.
    """
    nodes = declaring_nodes(opt_state)
    if not nodes:
        return params
    if is_fused(opt_state):  # the node's trees are the fused buffers
        _one_node(nodes)
        flat = flatten_params(params, group_by=opt_state.group_by)
        return unflatten_params(_apply(nodes[0], flat))
    if _overlap(nodes, params):
        _one_node(nodes)
    for node in nodes:
        params = _apply(node, params)
    return params


def _overlap(nodes: list[Any], params: Any) -> bool:
    """Whether two of ``nodes`` cover one leaf of ``params`` (a node outside any parameter
    group covers them all)."""
    counts = np.zeros(len(jax.tree.leaves(params)), int)
    for node in nodes:
        masked = _masked_leaves(node, params)
        counts += 1 if masked is None else ~np.asarray(jax.tree.leaves(masked), bool)
    return bool(counts.max() > 1)


def _one_node(nodes: list[Any]) -> None:
    if len(nodes) > 1:
        names = ", ".join(type(n).__name__ for n in nodes)
        raise ConfigError(
            f"the optimizer state declares evaluation parameters {len(nodes)} times ({names}) "
            "for the same parameters; at most one part of an optimizer may",
            param="optimizer",
        )


def declaring_nodes(opt_state: Any) -> list[Any]:
    """The nodes of ``opt_state`` whose type has an evaluation rule (`register_eval_params`),
    nested ones too (schedule-free inside Lookahead)."""
    found: list[Any] = []

    def visit(x: Any) -> bool:  # called on every subtree; never stops the descent
        if type(x) in _RULES:
            found.append(x)
        return False

    jax.tree.leaves(opt_state, is_leaf=visit)
    return found


def _apply(node: Any, params: Any) -> Any:
    """The rule on ``params``; where the node belongs to a parameter group, the leaves
    outside it (`optax.MaskedNode` in the node's trees) keep their training values."""
    rule = _RULES[type(node)]
    masked = _masked_leaves(node, params)
    if masked is None:
        return rule(node, params)
    # the rule sees every leaf (masked-out ones at their training value), then they are restored
    return jax.tree.map(
        lambda out, p, m: p if m else out, rule(_fill(node, params), params), params, masked
    )


def _masked_leaves(node: Any, params: Any) -> Any:
    """A tree of bools over ``params``: True where the node's ``z``-like trees hold
    `optax.MaskedNode`; ``None`` when nothing is masked."""
    trees = [v for v in _fields(node) if _same_outline(v, params)]
    if not trees:
        return None
    flags = jax.tree.map(
        lambda t, _: isinstance(t, optax.MaskedNode),
        trees[0],
        params,
        is_leaf=lambda t: isinstance(t, optax.MaskedNode),
    )
    return flags if any(jax.tree.leaves(flags)) else None


def _fill(node: Any, params: Any) -> Any:
    """``node`` with `optax.MaskedNode` leaves of its parameter-shaped fields replaced by
    the parameters' leaves there."""

    def fill(v):
        if not _same_outline(v, params):
            return v
        return jax.tree.map(
            lambda t, p: p if isinstance(t, optax.MaskedNode) else t,
            v,
            params,
            is_leaf=lambda t: isinstance(t, optax.MaskedNode),
        )

    return type(node)(*[fill(v) for v in _fields(node)])


def _fields(node: Any) -> list[Any]:
    return list(node) if isinstance(node, tuple) else []


def _same_outline(tree: Any, params: Any) -> bool:
    """Whether ``tree`` has ``params``' structure, counting `optax.MaskedNode` as a leaf."""
    is_masked = lambda t: isinstance(t, optax.MaskedNode)  # noqa: E731
    return jax.tree.structure(tree, is_leaf=is_masked) == jax.tree.structure(params)


register_eval_params(ScheduleFreeState, schedule_free_eval_params)
