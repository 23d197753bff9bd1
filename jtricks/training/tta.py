"""Test-time augmentation (TTA): average the model's predicted probabilities over
several augmented views of each example.

``p(y | x) = (1 / V) * (softmax(f(x)) + sum_{v=1}^{V-1} softmax(f(a(k_v, x))))``: view 0 is
the clean input, views ``1 .. V-1`` apply a per-example augmentation ``a`` (the same
``(key, x) -> x`` functions training uses, `jtricks.data.augment`) with the key
``fold_in(fold_in(key, v), i)`` for the example at index ``i`` of the evaluated set, so the
result does not depend on the batch size. The model runs in evaluation mode (running
BatchNorm statistics, no dropout). The average is taken in log space
(``logsumexp_v log_softmax_v - log V``), so the loss stays finite; that log-probability
plays the role of the logits for the loss and the accuracy.

New here: optax, Flax and chex have no TTA. fastai's ``Learner.tta`` averages random
training-augmented views the same way; the classic fixed views (crops, flips) are a
special case of an augmentation with no randomness.

References:
  Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
  Networks" (2012) (averaging predictions over patches and their reflections);
  Simonyan & Zisserman, "Very Deep Convolutional Networks" (2015), https://arxiv.org/abs/1409.1556
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.data.datasets import validate_arrays
from jtricks.errors import check_int
from jtricks.losses import accuracy, cross_entropy
from jtricks.training.distributed import like_state
from jtricks.training.model import apply_model
from jtricks.training.state import TrainState
from jtricks.training.steps import pad_batches

__all__ = ["evaluate_tta", "tta_log_probs"]


def _view_log_probs(state: TrainState, x, ids, key, augment, views: int) -> jax.Array:
    """Log of the mean softmax over ``views`` views of the batch ``x`` (global indices ``ids``)."""

    def log_probs(xv):
        logits, _ = apply_model(state, state.params, xv, train=False, key=None)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def body(v, acc):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, v), i))(ids)
        return jnp.logaddexp(acc, log_probs(jax.vmap(augment)(keys, x)))

    acc = jax.lax.fori_loop(1, views, body, log_probs(x))
    return acc - jnp.log(float(views))


@functools.cache
def _compiled(loss_fn: Callable, augment: Callable, views: int):
    @jax.jit
    def run(state, xb, yb, wb, key):
        nb, bs = xb.shape[:2]
        ids = jnp.arange(nb * bs, dtype=jnp.uint32).reshape(nb, bs)

        def body(carry, batch):
            x, y, w, i = batch
            logp = _view_log_probs(state, x, i, key, augment, views)
            sums = {
                "loss_sum": jnp.sum(w * loss_fn(logp, y)),
                "correct": jnp.sum(w * accuracy(logp, y)),
                "count": jnp.sum(w),
            }
            return jax.tree.map(jnp.add, carry, sums), logp

        zero = {"loss_sum": jnp.zeros(()), "correct": jnp.zeros(()), "count": jnp.zeros(())}
        sums, logp = jax.lax.scan(body, zero, (xb, yb, wb, ids))
        metrics = {
            "loss": sums["loss_sum"] / sums["count"],
            "accuracy": sums["correct"] / sums["count"],
        }
        return metrics, logp.reshape(nb * bs, -1)

    return run


def _run(state, data, augment, views, key, loss_fn, batch_size):
    x, y = (np.asarray(a) for a in data)
    validate_arrays(x, y, None, where="evaluation data")
    views = check_int("views", views, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    ((xb, yb), wb), key = like_state((pad_batches((x, y), batch_size), key), state.params)
    return _compiled(loss_fn, augment, views)(state, xb, yb, wb, key), len(y)


def evaluate_tta(
    state: TrainState,
    data: tuple[Any, Any],
    augment: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    views: int,
    key: jax.Array,
    loss_fn: Callable = cross_entropy,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean loss and accuracy of the ``views``-view TTA prediction on ``data``.

    ``views=1`` is the plain evaluation (clean input only). Compiled once per
    ``(loss_fn, augment, views)`` and data shape; deterministic for a given ``key`` and
    independent of ``batch_size``.

    Example:
      >>> evaluate_tta(state, (x_test, y_test), shift(2), views=9, key=jax.random.key(0))
    """
    (metrics, _), _ = _run(state, data, augment, views, key, loss_fn, batch_size)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def tta_log_probs(
    state: TrainState,
    x: Any,
    augment: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    views: int,
    key: jax.Array,
    batch_size: int = 1000,
) -> np.ndarray:
    """``log p(y | x)`` of the TTA prediction, shape ``(N, C)`` (see the module docstring)."""
    x = np.asarray(x)
    (_, logp), n = _run(
        state, (x, np.zeros(len(x), np.int32)), augment, views, key, cross_entropy, batch_size
    )
    return np.asarray(logp)[:n]
