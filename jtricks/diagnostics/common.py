"""What the checks share: their batch and task, parameters grouped by layer, BatchNorm
forced to its running averages, plain-text tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.tasks import Task, as_task
from jtricks.trees import named_leaves


def diagnostic_batch(
    x: Any, y: Any, task: Task | str | None, loss_fn: Callable | None
) -> tuple[Task, Any]:
    """``(task, batch)`` of a diagnostic's arguments: ``(x, y)``, or ``x`` a whole batch
    pytree when ``y`` is ``None``; the task as `fit` takes it (`jtricks.tasks.as_task`)."""
    batch = x if y is None else (x, y)
    return as_task(task, loss_fn), jax.tree.map(jnp.asarray, batch)


def layer_of(path: tuple[str, ...]) -> str:
    """``("Dense_0", "kernel") -> "Dense_0"``: a leaf's layer is its module path."""
    return "/".join(path[:-1]) if len(path) > 1 else path[0]


def group_by_layer(params: Any, order: Sequence[str] = ()) -> dict[str, list[tuple[str, ...]]]:
    """Leaves of ``params`` grouped by layer, layers sorted by their position in ``order``
    (the forward call order from `forward_layers`; unknown layers go last)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for path in named_leaves(params):
        out.setdefault(layer_of(path), []).append(path)
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def bn_eval_interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    """Force every `flax.linen.BatchNorm` to use its running averages."""
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    if module.use_running_average is None:
        return next_fun(*args, **{**kwargs, "use_running_average": True})
    # set at construction (the usual ``use_running_average=not train``): override it for
    # this one call, then put it back; flax forbids passing it at both places
    saved = module.use_running_average
    object.__setattr__(module, "use_running_average", True)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", saved)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
