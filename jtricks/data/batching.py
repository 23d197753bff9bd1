"""Device-resident batching: one epoch's batches as an index array built on device,
shuffled (`epoch_indices`) or drawn by a sampler (`sampled_indices`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.errors import ConfigError


def epoch_indices(key: jax.Array, num_examples: int, batch_size: int, num_steps: int) -> jax.Array:
    """Indices of ``num_steps`` shuffled mini-batches, shape ``(num_steps, batch_size)``.

    One permutation of ``range(num_examples)`` is drawn from ``key`` and cut into
    consecutive batches; the incomplete tail batch is dropped, so every example
    appears at most once per epoch. Works under `jax.jit` (sizes must be static).
    Gathering ``x[idx[i]]`` inside the compiled epoch loop keeps the data on device
    and never materialises a shuffled copy of the whole epoch.
    """
    if num_steps * batch_size > num_examples:
        raise ValueError(
            f"num_steps * batch_size = {num_steps * batch_size} exceeds num_examples = {num_examples}"
        )
    perm = jax.random.permutation(key, num_examples)
    return perm[: num_steps * batch_size].reshape(num_steps, batch_size).astype(jnp.int32)


def sampled_indices(
    key: jax.Array, probabilities: jax.Array, batch_size: int, num_steps: int
) -> jax.Array:
    """Indices of ``num_steps`` mini-batches drawn with replacement, example ``i`` with
    probability ``probabilities[i]``, shape ``(num_steps, batch_size)``: the epoch of a
    sampler (`class_balanced`), under `jax.jit` like `epoch_indices`."""
    n = probabilities.shape[0]
    idx = jax.random.choice(key, n, (num_steps, batch_size), replace=True, p=probabilities)
    return idx.astype(jnp.int32)


SAMPLERS = ("balanced",)
"""The samplers `fit` takes (``sampler=``; ``None``: shuffled epochs, each example once)."""


def class_balanced(labels: Any) -> np.ndarray:
    """Per-example probabilities ``1 / (K n_{y_i})`` (``K`` classes present): every class
    is drawn equally often, and examples within a class uniformly.

    Raises:
      ConfigError: labels that are not one integer class per example.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"sampler='balanced' draws by class: it needs integer labels (N,); got "
            f"{labels.dtype} {labels.shape}",
            param="sampler",
        )
    counts = np.bincount(labels)
    present = np.count_nonzero(counts)
    return (1.0 / (present * counts[labels])).astype(np.float32)
