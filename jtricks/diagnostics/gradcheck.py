"""`check_gradients`: `jax.grad` against central differences in float64, per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jtricks.diagnostics.common import (
    bn_eval_interceptor,
    diagnostic_batch,
    group_by_layer,
    text_table,
)
from jtricks.errors import check_int, check_range
from jtricks.tasks import Task
from jtricks.training.gradients import objective
from jtricks.training.state import TrainState
from jtricks.training.steps import LossFn
from jtricks.training.transfer import forward_layers
from jtricks.trees import named_leaves


@dataclass
class GradCheckReport:
    """Per-layer result of `check_gradients`.

    ``rows``: one dict per layer with ``layer``, ``coords`` (sampled), ``max_rel_error``,
    ``max_abs_error`` and ``passed``. ``passed`` is True when every layer passed.
    """

    rows: list[dict[str, Any]]
    tolerance: float
    passed: bool

    def table(self) -> str:
        return text_table(
            ["layer", "coords", "max rel error", "max abs error", "verdict"],
            [
                (
                    r["layer"],
                    r["coords"],
                    f"{r['max_rel_error']:.2e}",
                    f"{r['max_abs_error']:.2e}",
                    "pass" if r["passed"] else "FAIL",
                )
                for r in self.rows
            ],
        )


def check_gradients(
    state: TrainState,
    x: Any,
    y: Any = None,
    *,
    task: Task | str | None = None,
    loss_fn: LossFn | None = None,
    coords_per_layer: int = 10,
    eps: float = 1e-5,
    tolerance: float = 1e-4,
    floor: float = 1e-4,
    train: bool = True,
    seed: int = 0,
) -> GradCheckReport:
    """Compare `jax.grad` of the mean loss with central differences, in float64, per layer.

    For each sampled coordinate ``i`` of the flattened parameters,
    ``g_num = (L(w + eps e_i) - L(w - eps e_i)) / (2 eps)`` and the error is
    ``|g - g_num| / max(|g|, |g_num|, floor)``. A layer passes when its largest error is
    at most ``tolerance``. Everything (parameters, inputs, BatchNorm statistics) is cast
    to float64 inside `jax.enable_x64`, so rounding error (about ``1e-16 L / eps``) and
    truncation error (``O(eps^2)``) both sit far below the tolerance, and a wrong
    backward pass (a bad `jax.custom_vjp`, a misplaced `stop_gradient`) stands out by
    orders of magnitude. ``floor`` keeps coordinates whose true gradient is ~0 (dead
    ReLUs) from dividing rounding noise by zero. An all-zero kernel (``zero_head=True``)
    passes no gradient below it, so the check moves it to a random point (any point checks
    the backward pass): ``N(0, 1 / fan_in)``, seeded by ``seed``.

    With ``train=True`` (the default) the model runs in training mode with a fixed
    dropout key, and every BatchNorm is forced to its running averages, so the loss is
    a smooth, deterministic function of the parameters. ``train=False`` checks the
    evaluation-mode function instead.

    Args:
      state: the model and parameters to check (its ``key`` fixes the dropout masks).
      x, y: a small batch (a few examples suffice; each coordinate costs two forward
        passes), or ``x`` any batch pytree with ``y=None``.
      task, loss_fn: the loss, as in `fit` (neither: classification); ``L`` is the
        task's weighted mean training loss over the batch.
      coords_per_layer: coordinates sampled per layer (all of a layer's if it has fewer).
      seed: picks the coordinates.

    Returns:
      A `GradCheckReport` (``.table()`` formats it).
    """
    check_int("coords_per_layer", coords_per_layer, low=1)
    check_range("eps", eps, low=0.0, low_inclusive=False)
    check_range("tolerance", tolerance, low=0.0, low_inclusive=False)
    rng = np.random.default_rng(seed)
    task, batch = diagnostic_batch(x, y, task, loss_fn)
    order = forward_layers(state, task.inputs(batch))
    with jax.enable_x64(True):
        params, batch_stats, batch = _to64((state.params, state.batch_stats, batch))
        params = _unblocked(params, np.random.default_rng([seed, 1]))
        flat, unravel = ravel_pytree(params)
        variables_extra = {"batch_stats": batch_stats} if batch_stats else {}
        rngs = {"dropout": state.key} if train and state.key is not None else None

        def loss(theta):
            variables = {"params": unravel(theta), **variables_extra}
            with nn.intercept_methods(bn_eval_interceptor):
                outputs = state.apply_fn(variables, task.inputs(batch), train=train, rngs=rngs)
            return objective(task, outputs, batch, None)

        sampled = _sample(params, order, coords_per_layer, rng)
        all_idx = jnp.asarray(np.concatenate(list(sampled.values())))

        @jax.jit
        def both(theta, idx):
            analytic = jax.grad(loss)(theta)[idx]

            def central(i):
                e = jnp.zeros_like(theta).at[i].set(eps)
                return (loss(theta + e) - loss(theta - e)) / (2 * eps)

            return analytic, jax.lax.map(central, idx)

        analytic, numeric = (np.asarray(a) for a in both(flat, all_idx))
    rows = _layer_rows(sampled, analytic, numeric, floor, tolerance)
    return GradCheckReport(rows, tolerance, all(r["passed"] for r in rows))


def _to64(tree: Any) -> Any:
    """Floating leaves of ``tree`` in float64 (inside `jax.enable_x64`), others as they are."""
    return jax.tree.map(
        lambda a: (
            jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a
        ),
        tree,
    )


def _unblocked(params: Any, rng: np.random.Generator) -> Any:
    """``params`` with every all-zero kernel (2 or more dimensions) drawn from
    ``N(0, 1 / fan_in)``, ``fan_in`` the product of all but its last dimension."""

    def draw(a):
        if a.ndim < 2 or bool(jnp.any(a != 0)):
            return a
        std = 1.0 / np.sqrt(np.prod(a.shape[:-1]))
        return jnp.asarray(rng.normal(0.0, std, a.shape), a.dtype)

    return jax.tree.map(draw, params)


def _sample(params: Any, order: Any, per_layer: int, rng: np.random.Generator) -> dict:
    """Up to ``per_layer`` flat indices (in `ravel_pytree`'s order) of each layer's
    parameters, layers in forward order."""
    offsets, start = {}, 0  # the flat index range of every leaf
    for path, leaf in named_leaves(params).items():
        offsets[path] = (start, int(np.size(leaf)))
        start += int(np.size(leaf))
    sampled: dict[str, np.ndarray] = {}
    for layer, paths in group_by_layer(params, order).items():
        idx = np.concatenate([np.arange(s, s + n) for s, n in (offsets[p] for p in paths)])
        k = min(per_layer, idx.size)
        sampled[layer] = np.sort(rng.choice(idx, size=k, replace=False))
    return sampled


def _layer_rows(sampled: dict, analytic, numeric, floor: float, tolerance: float) -> list[dict]:
    """One report row per layer: its largest relative and absolute errors and its verdict."""
    abs_err = np.abs(analytic - numeric)
    rel_err = abs_err / np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    rows, pos = [], 0
    for layer, idx in sampled.items():
        sl = slice(pos, pos + idx.size)
        pos += idx.size
        worst = float(rel_err[sl].max())
        rows.append(
            {
                "layer": layer,
                "coords": int(idx.size),
                "max_rel_error": worst,
                "max_abs_error": float(abs_err[sl].max()),
                "passed": bool(worst <= tolerance),
            }
        )
    return rows
