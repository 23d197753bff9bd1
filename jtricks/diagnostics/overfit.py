"""`overfit_one_batch`: can the model and optimizer drive the loss on one small batch to ~0?"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.diagnostics.common import diagnostic_batch
from jtricks.errors import check_int, check_range
from jtricks.plotting import save_figure, subplots
from jtricks.tasks import LanguageModel, Task
from jtricks.training.state import create_train_state
from jtricks.training.steps import EvalStep, LossFn, make_train_step


@dataclass
class OverfitReport:
    """Result of `overfit_one_batch`: the loss of every step, and the verdict."""

    losses: np.ndarray
    epsilon: float
    steps_to_epsilon: int | None
    passed: bool
    floor: float = 0.0
    """The lowest loss any model reaches on the batch (`memorisation_floor`)."""
    eval_loss: float = math.nan
    """The batch's loss in evaluation mode after the last step (no dropout, BatchNorm's
    running statistics)."""

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1])


def overfit_one_batch(
    model: nn.Module,
    tx: optax.GradientTransformation,
    x: Any,
    y: Any = None,
    *,
    key: jax.Array,
    steps: int = 300,
    epsilon: float = 0.01,
    task: Task | str | None = None,
    loss_fn: LossFn | None = None,
) -> OverfitReport:
    """Train a fresh model on one batch ``(x, y)`` (or ``x`` any batch pytree with
    ``y=None``) for ``steps`` steps (one compiled `lax.scan`), on ``task``'s or
    ``loss_fn``'s loss as in `fit` (neither: classification).

    Passes when the training loss falls below ``epsilon`` within ``steps`` steps, or the
    batch's loss in evaluation mode does after them (``eval_loss``: dropout's noise keeps
    the training loss of a model that has memorised the batch up): a correct model with
    enough capacity memorises a small batch (Karpathy 2019). Failing points to a bug such
    as labels that change from step to step, a layer cut off from the gradient, or a
    learning rate far off.
    """
    check_int("steps", steps, low=1)
    check_range("epsilon", epsilon, low=0.0, low_inclusive=False)
    task, batch = diagnostic_batch(x, y, task, loss_fn)
    state = create_train_state(model, tx, task.inputs(batch), key)
    train_step = make_train_step(task=task, norms=False, skip_nonfinite=False)
    eval_step = EvalStep(task)
    weight = jnp.ones((len(jax.tree.leaves(batch)[0]),), jnp.float32)

    @jax.jit
    def run(state):
        def body(s, _):
            s, m = train_step(s, batch)
            return s, m["loss"]

        state, losses = jax.lax.scan(body, state, None, length=steps)
        return losses, eval_step.metrics(eval_step(state, batch, weight))["loss"]

    losses, eval_loss = jax.device_get(run(state))
    floor = memorisation_floor(task, batch)
    below = np.flatnonzero(losses < floor + epsilon)
    first = int(below[0]) + 1 if below.size else None
    passed = first is not None or bool(eval_loss < floor + epsilon)
    return OverfitReport(np.asarray(losses), epsilon, first, passed, floor, float(eval_loss))


def memorisation_floor(task: Task, batch: Any) -> float:
    """The lowest mean loss any model reaches on ``batch``: 0, except for a language
    model, which predicts token ``t + 1`` from tokens ``0..t`` only. Where sequences of
    the batch share a prefix and go on differently, the best prediction is the observed
    frequencies ``p_k`` of what follows, so the floor is the mean over real target
    positions of ``-sum_k p_k log p_k`` within each group of equal prefixes (0.027 for
    32 sequences of the ``tokens`` dataset, most of it from their first positions)."""
    if not isinstance(task, LanguageModel):
        return 0.0
    x, y = np.asarray(task.inputs(batch)), np.asarray(task.targets(batch))
    valid = np.asarray(task.valid(batch)) > 0
    if x.shape != y.shape or x.ndim != 2:  # not token ids beside their next tokens
        return 0.0
    follow: dict[bytes, collections.Counter] = collections.defaultdict(collections.Counter)
    for i, t in zip(*np.nonzero(valid), strict=True):
        follow[x[i, : t + 1].tobytes()][int(y[i, t])] += 1
    total = 0.0
    for counts in follow.values():
        n = sum(counts.values())
        total -= sum(k * math.log(k / n) for k in counts.values())
    return total / max(int(valid.sum()), 1)


def plot_overfit(rep: OverfitReport, path: Any) -> None:

    fig, ax = subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(rep.losses) + 1), rep.losses)
    label = f"epsilon {rep.epsilon:g}" + (f" above the floor {rep.floor:.3g}" if rep.floor else "")
    ax.axhline(rep.floor + rep.epsilon, color="C3", ls="--", label=label)
    ax.set(yscale="log", xlabel="step", ylabel="training loss", title="overfit one batch")
    save_figure(fig, path, axes=(ax,))
