"""Test-time augmentation (TTA): average the model's predicted probabilities over
several augmented views of each example.

``p(y | x) = (1 / V) * (softmax(f(x)) + sum_{v=1}^{V-1} softmax(f(a(k_v, x))))``: view 0 is
the clean input, views ``1 .. V-1`` apply a per-example augmentation ``a`` (the same
``(key, x) -> x`` functions training uses, `jtricks.data.augment`) with the key
``fold_in(fold_in(key, v), i)`` for the example at index ``i`` of the evaluated set, so the
result does not depend on the batch size. The model runs in evaluation mode (running
BatchNorm statistics, no dropout). The average is taken in log space
(``logsumexp_v log_softmax_v - log V``), so the loss stays finite; that log-probability
plays the role of the logits for the loss and the accuracy. Other tasks combine the views
with `jtricks.tasks.Task.combine` too: a regression averages the outputs,
``y(x) = (1 / V) sum_v f(a(k_v, x))``, a multi-label task the sigmoid probabilities.

New here: optax, Flax and chex have no TTA. fastai's ``Learner.tta`` averages random
training-augmented views the same way; the classic fixed views (crops, flips) are a
special case of an augmentation with no randomness.

References:
  Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
  Networks" (2012) (averaging predictions over patches and their reflections);
  Simonyan & Zisserman, "Very Deep Convolutional Networks" (2015), https://arxiv.org/abs/1409.1556
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.caches import cached
from jtricks.errors import ConfigError, check_int
from jtricks.tasks import Classification, LanguageModel, Task, as_task, batch_sums, finalize
from jtricks.training.data_checks import centered, check_data, input_outputs
from jtricks.training.distributed import like_state
from jtricks.training.loop import record_value
from jtricks.training.model import apply_model
from jtricks.training.state import (
    TrainState,
    check_eval_source,
    evaluation_states,
    first_member,
    is_ensemble,
)
from jtricks.training.steps import ensemble_metrics, ensemble_sums, pad_batches

__all__ = ["evaluate_tta", "tta_log_probs"]


def _combined_outputs(state: TrainState, task: Task, x, ids, key, augment, views: int):
    """``task.combine`` of the model's outputs on ``views`` views of the batch ``x`` (global
    indices ``ids``): the clean input, then ``views - 1`` augmented ones."""

    def outputs(xv):
        out, _ = apply_model(state, state.params, xv, train=False, key=None)
        return out.astype(jnp.float32)

    def view(v):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, v), i))(ids)
        return outputs(jax.vmap(augment)(keys, x))

    augmented = jax.lax.map(view, jnp.arange(1, views)) if views > 1 else None
    clean = outputs(x)[None]
    stacked = clean if augmented is None else jnp.concatenate([clean, augmented])
    return task.combine(stacked)


@cached
def _compiled(task: Task, augment: Callable, views: int, stacked: bool):
    def sums(state, batch, w, ids, key):
        """The batch's sums and the prediction (stacked: every member's views, then the
        ensemble's `task.combine` of the members, as `EnsembleEvalStep`)."""
        x = task.inputs(batch)
        if not stacked:
            out = _combined_outputs(state, task, x, ids, key, augment, views)
            return batch_sums(task, out, batch, w), out
        members = jax.vmap(lambda s: _combined_outputs(s, task, x, ids, key, augment, views))
        out = members(state)
        return ensemble_sums(task, out, state.hparams, batch, w), task.combine(out)

    @jax.jit
    def run(state, batches, wb, key):
        nb, bs = wb.shape
        ids = jnp.arange(nb * bs, dtype=jnp.uint32).reshape(nb, bs)

        def body(carry, inp):
            batch_sums_, out = sums(state, *inp, key)
            return jax.tree.map(jnp.add, carry, batch_sums_), out

        first = jax.tree.map(lambda a: a[0], (batches, wb, ids))
        shapes = jax.eval_shape(lambda *a: sums(state, *a, key)[0], *first)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
        total, out = jax.lax.scan(body, zero, (batches, wb, ids))
        metrics = ensemble_metrics(task, total) if stacked else finalize(task, total)
        return metrics, out.reshape(nb * bs, *out.shape[2:])

    return run


def _run(state, data, augment, views, key, task, batch_size, params="auto"):
    source = check_eval_source(params, first_member(state))
    stacked = is_ensemble(state)
    state = evaluation_states(state, source)
    data = check_data(first_member(state), task, data, "evaluation data")
    task = centered(task, data)
    views = check_int("views", views, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    (batches, wb), key = like_state((pad_batches(data, batch_size), key), state.params)
    return _compiled(task, augment, views, stacked)(state, batches, wb, key)


def evaluate_tta(
    state: TrainState,
    data: Any,
    augment: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    views: int,
    key: jax.Array,
    loss_fn: Callable | None = None,
    task: Task | str | None = None,
    batch_size: int = 1000,
    params: str = "auto",
) -> dict[str, float]:
    """The task's loss and metrics of the ``views``-view TTA prediction on ``data``, on the
    parameters ``state.evaluation_state(params)`` (``"auto"``, ``"train"``, ``"ema"``).

    The prediction is ``task.combine`` of the views' outputs: the mean softmax for
    classification (in log space), the mean output for regression, the mean sigmoid for
    multi-label tasks. ``views=1`` is the plain evaluation (clean input only). Compiled
    once per ``(task, augment, views)`` and data shape; deterministic for a given ``key``
    and independent of ``batch_size``.

    Example:
      >>> evaluate_tta(state, (x_test, y_test), shift(2), views=9, key=jax.random.key(0))
    """
    task = as_task(task, loss_fn)
    if task.dense_targets or isinstance(task, LanguageModel):
        raise ConfigError(
            f"test-time augmentation averages whole-example predictions; the {task.name} task "
            "predicts per position",
            param="tta",
        )
    metrics, _ = _run(state, data, augment, views, key, task, batch_size, params)
    metrics = jax.device_get(metrics)
    loss = float(metrics.pop("loss"))
    return {"loss": loss, **{k: record_value(k, v) for k, v in metrics.items()}}


def tta_log_probs(
    state: TrainState,
    x: Any,
    augment: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    views: int,
    key: jax.Array,
    batch_size: int = 1000,
    params: str = "auto",
) -> np.ndarray:
    """``log p(y | x)`` of the classification TTA prediction, shape ``(N, C)``, on the
    parameters ``state.evaluation_state(params)``."""
    kwargs = dict(views=views, key=key, batch_size=batch_size, params=params)
    return tta_predict(state, x, augment, task=Classification(), **kwargs)


def tta_predict(
    state: TrainState,
    x: Any,
    augment: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    views: int,
    key: jax.Array,
    task: Task | str | None = None,
    batch_size: int = 1000,
    params: str = "auto",
) -> np.ndarray:
    """The TTA prediction `evaluate_tta` scores, ``(N, ...)``: ``task.combine`` of the
    outputs on the clean input and ``views - 1`` augmented ones (classification, the
    default: the log of the mean softmax; multi-label: the logits of the mean sigmoid;
    regression: the mean output), on the parameters ``state.evaluation_state(params)``."""
    x, task = np.asarray(x), as_task(task)
    if isinstance(task, Classification):
        targets = np.zeros(len(x), np.int32)
    else:  # stand-in targets of the outputs' shape: the metrics are not read
        shape = input_outputs(first_member(state), x, "tta inputs").shape[1:]
        targets = np.zeros((len(x), *shape), np.float32)
    _, out = _run(state, (x, targets), augment, views, key, task, batch_size, params)
    return np.asarray(out)[: len(x)]
