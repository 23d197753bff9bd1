"""The training state: one immutable pytree per run."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's `TrainState` (step, apply_fn, params, tx, opt_state) plus what a full run needs.

    New here:
      batch_stats: the model's mutable ``batch_stats`` collection (empty dict if none).
      key: the run's PRNG key for training noise. The dropout key of step ``t`` is
        ``fold_in(key, t)``, so it depends only on the key and the step count.

    ``step`` is an int32 array from the start, so the first and later calls of a
    jitted step see the same types and compile once.
    """

    batch_stats: Any = None
    key: jax.Array | None = None


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample_x: Any,
    key: jax.Array,
) -> TrainState:
    """Initialise a model and optimizer into a `TrainState`.

    Args:
      model: a Linen module whose ``__call__`` takes ``(x, *, train)``.
      tx: any optax transformation.
      sample_x: an example batch (only its shape and dtype matter; one example suffices).
      key: PRNG key, split as ``init_key, dropout_key = jax.random.split(key)``.

    Example:
      >>> state = create_train_state(MLP(10), optax.adam(1e-3), x[:1], jax.random.key(0))
    """
    init_key, dropout_key = jax.random.split(key)
    variables = model.init({"params": init_key}, jnp.asarray(sample_x[:1]), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=batch_stats,
        key=dropout_key,
    )
