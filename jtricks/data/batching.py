"""Device-resident batching: one epoch's shuffled batches as an index array built on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
