"""Vmapped ensembles (T09): N models trained at once in one compiled program.

`create_ensemble` stacks N `TrainState`s (one per key: different initialisations
and dropout masks) along a leading axis with `jax.vmap`; `fit_ensemble` trains
them with the train step vmapped over that axis (every member sees the same
batches), one `lax.scan` per epoch, and validates each member and the
ensemble. The ensemble predicts the mean of the members' softmax probabilities.

Member ``i`` equals a separate `fit` run from ``create_train_state(model, tx, x,
keys[i])`` with the same ``data_key`` (tested), so an ensemble is N independent
runs that share one program, one dispatch per epoch and the data transfers.

References:
  Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty Estimation using
  Deep Ensembles" (2017), https://arxiv.org/abs/1612.01474
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.data.batching import epoch_indices
from jtricks.errors import ConfigError, check_int
from jtricks.losses import accuracy, cross_entropy
from jtricks.optim.fused import flat_train_state, is_fused, tree_train_state
from jtricks.training.fit import History
from jtricks.training.model import apply_model
from jtricks.training.state import TrainState, create_train_state
from jtricks.training.steps import LossFn, make_train_step, pad_batches


def create_ensemble(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample_x: Any,
    keys: jax.Array,
    *,
    ema_decay: float | None = None,
) -> TrainState:
    """``len(keys)`` states stacked on a leading axis: member ``i`` is
    ``create_train_state(model, tx, sample_x, keys[i])``."""
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ConfigError(f"keys must be a 1-D array of N >= 1 keys; got shape {keys.shape}")
    sample = jnp.asarray(sample_x[:1])
    return jax.vmap(lambda k: create_train_state(model, tx, sample, k, ema_decay=ema_decay))(keys)


def ensemble_size(states: TrainState) -> int:
    return int(states.step.shape[0]) if states.step.ndim == 1 else 0


def _member_logits(states: TrainState, x: jax.Array) -> jax.Array:
    """Evaluation-mode logits of every member, ``(N, batch, C)``."""
    return jax.vmap(lambda s: apply_model(s, s.params, x, train=False, key=None)[0])(states)


def _evaluate(states, xb, yb, wb, loss_fn):
    """Per-member and ensemble loss/accuracy over padded batches (weights mark real rows)."""

    def body(carry, batch):
        x, y, w = batch
        logits = _member_logits(states, x)  # (N, B, C)
        member_loss = jax.vmap(lambda z: loss_fn(z, y))(logits)  # (N, B)
        member_correct = jax.vmap(lambda z: accuracy(z, y))(logits)
        # ensemble: mean of probabilities, scored by its negative log-likelihood
        log_p = jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(logits.shape[0])
        ens_loss = cross_entropy(log_p, y)
        ens_correct = accuracy(log_p, y)
        out = {
            "member_loss": jnp.sum(w * member_loss, axis=1),
            "member_correct": jnp.sum(w * member_correct, axis=1),
            "loss": jnp.sum(w * ens_loss),
            "correct": jnp.sum(w * ens_correct),
            "count": jnp.sum(w),
        }
        return jax.tree.map(jnp.add, carry, out), None

    n = jax.tree.leaves(states.params)[0].shape[0]
    zero = {
        "member_loss": jnp.zeros(n),
        "member_correct": jnp.zeros(n),
        "loss": jnp.zeros(()),
        "correct": jnp.zeros(()),
        "count": jnp.zeros(()),
    }
    s, _ = jax.lax.scan(body, zero, (xb, yb, wb))
    return {
        "loss": s["loss"] / s["count"],
        "accuracy": s["correct"] / s["count"],
        "member_loss": s["member_loss"] / s["count"],
        "member_accuracy": s["member_correct"] / s["count"],
    }


@partial(jax.jit, static_argnames=("loss_fn",))
def _evaluate_jit(states, xb, yb, wb, loss_fn):
    return _evaluate(states, xb, yb, wb, loss_fn)


def evaluate_ensemble(
    states: TrainState,
    data: tuple[Any, Any],
    *,
    batch_size: int = 1000,
    loss_fn: LossFn = cross_entropy,
) -> dict[str, Any]:
    """``loss`` / ``accuracy`` of the ensemble (mean softmax probabilities) and
    ``member_loss`` / ``member_accuracy`` (lists, one per member) on ``data``."""
    out = jax.device_get(
        _evaluate_jit(
            states, *_flat(pad_batches(data, check_int("batch_size", batch_size, low=1))), loss_fn
        )
    )
    return {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in out.items()}


def _flat(padded):
    (xb, yb), wb = padded
    return xb, yb, wb


def predict_proba(states: TrainState, x: Any) -> jax.Array:
    """The ensemble's predictive distribution: the mean of the members' softmax probabilities."""
    return jnp.mean(jax.nn.softmax(_member_logits(states, jnp.asarray(x))), axis=0)


@functools.cache
def _epoch_fn(loss_fn: LossFn, augment: Callable | None):
    """The jitted ensemble epoch, cached per loss and augmentation so repeated calls reuse it."""
    train_step = jax.vmap(make_train_step(loss_fn, augment=augment), in_axes=(0, None))

    @partial(jax.jit, static_argnames=("batch_size",), donate_argnums=0)
    def run_epoch(states, x, y, data_key, epoch, offset, val, *, num_steps, batch_size):
        n = x.shape[0]
        spe = n // batch_size
        idx = epoch_indices(jax.random.fold_in(data_key, epoch), n, batch_size, spe)
        fused = is_fused(states.opt_state)
        if fused:  # per member: flat params inside the epoch (see make_epoch_fn)
            states = jax.vmap(flat_train_state)(states)

        def body(j, carry):
            states, loss, acc, nonfinite = carry
            i = idx[offset + j]
            states, m = train_step(states, (x[i], y[i]))
            return (
                states,
                loss + jnp.mean(m["loss"]),
                acc + jnp.mean(m["accuracy"]),
                nonfinite + jnp.sum(m["nonfinite"]),
            )

        zero = jnp.zeros((), jnp.float32)
        # the step count is traced: a short last epoch reuses the program
        states, loss, acc, nonfinite = jax.lax.fori_loop(
            0, num_steps, body, (states, zero, zero, jnp.zeros((), jnp.int32))
        )
        if fused:
            states = jax.vmap(tree_train_state)(states)
        metrics = {
            "train_loss": loss / num_steps,
            "train_accuracy": acc / num_steps,
            "train_nonfinite": nonfinite,
        }
        if val is not None:
            ev = _evaluate(states, *val, loss_fn)
            metrics.update({f"val_{k}": v for k, v in ev.items()})
        return states, metrics

    return run_epoch


def fit_ensemble(
    states: TrainState,
    train_data: tuple[Any, Any],
    *,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    val_data: tuple[Any, Any] | None = None,
    data_key: jax.Array,
    loss_fn: LossFn = cross_entropy,
    eval_batch_size: int = 1000,
    augment: Callable | None = None,
    reporter: Any = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainState, History]:
    """Train stacked ``states`` (from `create_ensemble`) together: one compiled program per
    epoch runs the vmapped train step over the epoch's batches and validates.

    Records hold the members' mean ``train_loss`` / ``train_accuracy``, the ensemble's
    ``val_loss`` / ``val_accuracy`` and the lists ``val_member_accuracy`` /
    ``val_member_loss``. Epoch shuffles use ``fold_in(data_key, epoch)`` as in `fit`, so
    member ``i`` sees the batches a separate `fit` run with the same ``data_key`` sees.
    A non-finite step is skipped per member (as in `fit`); the count is logged.
    """
    x, y = jnp.asarray(train_data[0]), jnp.asarray(train_data[1])
    n = x.shape[0]
    batch_size = check_int("batch_size", batch_size, low=1, high=n)
    spe = n // batch_size
    if (epochs is None) == (steps is None):
        raise ConfigError("give epochs or steps, not both", param="epochs")
    total = (
        check_int("epochs", epochs, low=1) * spe
        if epochs is not None
        else check_int("steps", steps, low=1)
    )
    val = _flat(pad_batches(val_data, eval_batch_size)) if val_data is not None else None
    run_epoch = _epoch_fn(loss_fn, augment)
    history = History()
    start = int(np.asarray(states.step).reshape(-1)[0])
    done, t0 = 0, time.perf_counter()
    t_last = t0
    if reporter is not None:
        reporter.start(total_steps=total, done=0)
    try:
        while done < total:
            epoch, offset = divmod(start + done, spe)
            num = min(spe - offset, total - done)
            states, metrics = run_epoch(
                states,
                x,
                y,
                data_key,
                np.int32(epoch),
                np.int32(offset),
                val,
                num_steps=np.int32(num),
                batch_size=batch_size,
            )
            metrics = jax.device_get(metrics)
            done += num
            record: dict[str, Any] = {"epoch": epoch + 1, "step": start + done}
            for k, v in metrics.items():
                record[k] = np.asarray(v).tolist() if np.ndim(v) else float(v)
            record["train_nonfinite"] = int(record["train_nonfinite"])
            now = time.perf_counter()
            record["steps_per_s"] = num / (now - t_last)
            record["elapsed_s"] = now - t0
            t_last = now
            history.records.append(record)
            if reporter is not None:
                reporter.epoch_end(record, done=done)
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        if reporter is not None:
            reporter.close()
    return states, history
