"""The hand-written Flax + optax train step that jtricks' train-step figures are measured
against: the usual style (``value_and_grad``, ``tx.update``, ``optax.apply_updates``),
written without any jtricks code so that a ratio to it is a ratio to plain JAX.

The step trains a Linen classifier (or a causal language model, when the targets have a
position axis) on device-resident data gathered by an index array, with the softmax
cross-entropy averaged over examples (and positions). With ``compute=jnp.bfloat16`` the
parameters and floating inputs are cast for the forward and backward pass; the master
weights, the loss and the optimizer stay float32.

    carry = init_carry(model, tx, x, key)
    step = make_step(model, tx, x, y, compute=None)   # (carry, idx) -> (carry, loss)
    one = jax.jit(step, donate_argnums=0)              # one call per batch
    epoch = jax.jit(lambda c, idxs: jax.lax.scan(step, c, idxs), donate_argnums=0)
    evaluate = make_eval(model, x_val, y_val)         # (params, batch_stats) -> metrics
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def init_carry(model: Any, tx: optax.GradientTransformation, x: jax.Array, key: jax.Array):
    """``(params, batch_stats, opt_state)`` of a fresh model (``batch_stats`` empty if none)."""
    variables = model.init(key, x[:1], train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params)


def make_step(
    model: Any,
    tx: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    compute: Any = None,
) -> Callable:
    """``step((params, batch_stats, opt_state), idx) -> (carry, loss)`` on ``x[idx], y[idx]``."""

    def step(carry, idx):
        params, bs, opt = carry
        xb, yb = x[idx], y[idx]

        def loss_fn(p):
            pc, xc = p, xb
            if compute is not None:
                pc = jax.tree.map(lambda a: a.astype(compute), p)
                xc = xb.astype(compute) if jnp.issubdtype(xb.dtype, jnp.floating) else xb
            logits, upd = model.apply(
                {"params": pc, "batch_stats": bs}, xc, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
            new_bs = jax.tree.map(lambda a, o: a.astype(o.dtype), upd["batch_stats"], bs)
            return loss.mean(), new_bs

        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, u), bs, opt), loss

    return step


def make_eval(model: Any, x: jax.Array, y: jax.Array) -> Callable:
    """``evaluate(params, batch_stats) -> {"loss", "accuracy"}`` on all of ``x, y`` in one
    forward pass (inference mode), as the Flax examples evaluate their test split:
    ``loss = mean_i CE(f(x_i), y_i)``, ``accuracy = mean_i [argmax f(x_i) = y_i]``."""

    def evaluate(params, bs):
        logits = model.apply({"params": params, "batch_stats": bs}, x, train=False)
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return {"loss": loss, "accuracy": (logits.argmax(-1) == y).mean()}

    return evaluate
