"""Loss functions, numerically stable from logits (T20)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, ``-log softmax(z)_y``.

    Computed as ``logsumexp(z) - z_y`` by optax, so it is finite for any finite logits.

    Args:
      logits: ``(N, C)`` unnormalised scores.
      labels: ``(N,)`` integers in ``[0, C)``.

    Returns:
      ``(N,)`` losses; average them yourself (with weights if batches are padded).
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness of ``argmax(logits) == labels`` as float32."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
