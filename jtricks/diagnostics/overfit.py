"""`overfit_one_batch`: can the model and optimizer drive the loss on one small batch to ~0?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.errors import check_int, check_range
from jtricks.losses import cross_entropy
from jtricks.plotting import pyplot, save_figure
from jtricks.training.state import create_train_state
from jtricks.training.steps import LossFn, make_train_step


@dataclass
class OverfitReport:
    """Result of `overfit_one_batch`: the loss of every step, and the verdict."""

    losses: np.ndarray
    epsilon: float
    steps_to_epsilon: int | None
    passed: bool

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1])


def overfit_one_batch(
    model: nn.Module,
    tx: optax.GradientTransformation,
    x: Any,
    y: Any,
    *,
    key: jax.Array,
    steps: int = 300,
    epsilon: float = 0.01,
    loss_fn: LossFn = cross_entropy,
) -> OverfitReport:
    """Train a fresh model on one batch ``(x, y)`` for ``steps`` steps (one compiled `lax.scan`).

    Passes when the training loss falls below ``epsilon`` within ``steps`` steps: a correct
    model with enough capacity memorises a small batch (Karpathy 2019). Failing points to
    a bug such as labels that change from step to step, a layer cut off from the gradient,
    or a learning rate far off. Turn dropout off for this check (its noise keeps the
    training loss up).
    """
    check_int("steps", steps, low=1)
    check_range("epsilon", epsilon, low=0.0, low_inclusive=False)
    x, y = jnp.asarray(x), jnp.asarray(y)
    state = create_train_state(model, tx, x, key)
    train_step = make_train_step(loss_fn, norms=False, skip_nonfinite=False)

    @jax.jit
    def run(state):
        def body(s, _):
            s, m = train_step(s, (x, y))
            return s, m["loss"]

        return jax.lax.scan(body, state, None, length=steps)[1]

    losses = np.asarray(run(state))
    below = np.flatnonzero(losses < epsilon)
    first = int(below[0]) + 1 if below.size else None
    return OverfitReport(losses, epsilon, first, first is not None)


def plot_overfit(rep: OverfitReport, path: Any) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(rep.losses) + 1), rep.losses)
    ax.axhline(rep.epsilon, color="C3", ls="--", label=f"epsilon {rep.epsilon:g}")
    ax.set(yscale="log", xlabel="step", ylabel="training loss", title="overfit one batch")
    save_figure(fig, path, axes=(ax,))
