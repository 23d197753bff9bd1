"""One batch's objective and gradient, in mixed precision and over accumulated micro-batches.

`make_train_step` (`jtricks.training.steps`) binds these to its task, precision and
accumulation; they are pure functions of the state, parameters, batch and key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jtricks.tasks import Task
from jtricks.tasks.base import at_least_f32, per_example
from jtricks.training.data_checks import num_examples
from jtricks.training.model import apply_model

Batch = Any  # a pytree of arrays with a common leading (example) axis


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``dtype`` (integer leaves, e.g. tokens, kept)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def widen_floats(tree: Any) -> Any:
    """Floating leaves of ``tree`` in float32 at least: bfloat16 and float16 widened, a
    float64 model's outputs under `jax.enable_x64` kept (its loss and gradients stay in
    float64)."""
    return jax.tree.map(
        lambda a: at_least_f32(a) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def objective(task: Task, outputs: Any, batch: Batch, total: jax.Array | None) -> jax.Array:
    """``sum_i w_i l_i / W``: the task's weighted mean training loss (`Task.train_loss`). ``W`` is ``total`` when given (the
    whole batch's weight, so that micro-batch objectives add up to the batch's), else this
    batch's own ``sum_i w_i``."""
    loss = per_example(task, task.train_loss(outputs, batch), num_examples(batch))
    weight = task.loss_weight(batch)
    if weight is None:
        return jnp.mean(loss) if total is None else jnp.sum(loss) / total
    return jnp.sum(weight * loss) / (jnp.sum(weight) if total is None else total)


def micro_batches(batch: Batch, accumulate: int) -> Batch:
    """``batch`` reshaped to ``(accumulate, N / accumulate, ...)``."""
    n = num_examples(batch)
    if n % accumulate:
        raise ValueError(
            f"batch of {n} is not divisible into accumulate={accumulate} micro-batches"
        )
    return jax.tree.map(lambda a: a.reshape(accumulate, n // accumulate, *a.shape[1:]), batch)


def forward(task: Task, compute_dtype: Any, state, params, batch, key, total):
    """Objective, outputs and new BatchNorm statistics of one (micro-)batch; with
    ``compute_dtype`` the parameters and inputs are cast to it, the outputs back to
    float32 (float64 ones kept: `widen_floats`), and the statistics keep their own dtype
    (Flax's BatchNorm keeps float32 statistics, which float64 inputs would widen)."""
    task = task.using(state.hparams)
    inputs = task.inputs(batch)
    if compute_dtype is not None:
        params, inputs = cast_floats(params, compute_dtype), cast_floats(inputs, compute_dtype)
    outputs, batch_stats = apply_model(state, params, inputs, train=True, key=key)
    outputs = widen_floats(outputs)
    batch_stats = jax.tree.map(lambda n, o: n.astype(o.dtype), batch_stats, state.batch_stats)
    return objective(task, outputs, batch, total), (outputs, batch_stats)


def gradients(forward_fn, task: Task, accumulate: int, state, batch, key):
    """``((loss, (outputs, batch_stats)), grads)`` of the batch. With ``accumulate > 1``
    the batch is cut into micro-batches run one after another in a `lax.scan` (one
    micro-batch's activations live at a time); each contributes ``sum_i w_i l_i / W``
    with ``W`` the whole batch's weight, so the summed gradients equal the whole batch's
    (for a model without BatchNorm: each micro-batch normalises by its own statistics,
    which carry from one micro-batch to the next)."""
    if accumulate == 1:
        grad_fn = jax.value_and_grad(lambda p: forward_fn(state, p, batch, key, None), has_aux=True)
        return grad_fn(state.params)
    weight = task.loss_weight(batch)
    total = jnp.float32(num_examples(batch)) if weight is None else jnp.sum(weight)

    def micro(carry, inp):
        grads_sum, loss_sum, stats = carry
        mb, k = inp
        (loss, (outputs, stats)), g = jax.value_and_grad(
            lambda p: forward_fn(state.replace(batch_stats=stats), p, mb, k, total),
            has_aux=True,
        )(state.params)
        return (
            jax.tree.map(jnp.add, grads_sum, g),
            loss_sum + loss.astype(jnp.float32),
            stats,
        ), outputs

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    keys = jax.random.split(key, accumulate)
    (grads, loss, stats), outputs = jax.lax.scan(
        micro,
        (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
        (micro_batches(batch, accumulate), keys),
    )
    outputs = jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), outputs)
    return (loss, (outputs, stats)), grads
