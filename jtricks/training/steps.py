"""Pure train and eval steps, and a whole epoch as one `lax.scan`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.data.augment import mix_batch
from jtricks.data.batching import epoch_indices
from jtricks.errors import ConfigError, check_int
from jtricks.losses import accuracy, cross_entropy
from jtricks.optim.fused import flat_train_state, is_fused, tree_train_state, unflatten_params
from jtricks.optim.pipeline import current_learning_rate
from jtricks.training.state import TrainState

PRECISIONS = {"float32": None, "bf16": jnp.bfloat16}

Batch = tuple[jax.Array, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _apply(state: TrainState, params: Any, x: jax.Array, *, train: bool, key: jax.Array | None):
    """Run the model; returns ``(logits, new_batch_stats)``. `Flat` parameters (the fused
    optimizer's layout) are cut back into their tree here, inside the compiled step."""
    variables = {"params": unflatten_params(params)}
    rngs = {"dropout": key} if key is not None else None
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        if train:
            logits, updates = state.apply_fn(
                variables, x, train=True, rngs=rngs, mutable=["batch_stats"]
            )
            return logits, updates["batch_stats"]
    return state.apply_fn(variables, x, train=train, rngs=rngs), state.batch_stats


def make_train_step(
    loss_fn: LossFn = cross_entropy,
    *,
    norms: bool = True,
    update_norm: bool = False,
    skip_nonfinite: bool = True,
    augment: Callable | None = None,
    mix: tuple[str, float, int] | None = None,
    accumulate: int = 1,
    precision: str = "float32",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build ``train_step(state, (x, y)) -> (state, metrics)``.

    One step: forward in training mode with dropout key ``fold_in(state.key, state.step)``,
    mean loss, gradient, optax update, new BatchNorm statistics. Metrics are
    the batch's ``loss`` and ``accuracy``, the ``learning_rate`` when the optimizer
    state holds one, and with ``norms=True`` the gradient's global L2 norm
    ``grad_norm``; with ``update_norm=True`` also ``update_norm`` and ``param_norm``.

    The update norm is off by default: measured on the 2-core CPU it costs
    15-25% of a small model's step (it keeps XLA from fusing the update into the
    parameter write), while the gradient norm costs nothing measurable. `fit`
    logs the parameter norm once per epoch instead.

    Args:
      loss_fn: per-example loss ``(logits, labels) -> (N,)``.
      norms: return ``grad_norm``.
      update_norm: also return ``update_norm`` and ``param_norm`` every step.
      skip_nonfinite: if the loss or any gradient entry is NaN or inf, keep the old
        parameters, optimizer state and BatchNorm statistics (the step still counts);
        the metric ``nonfinite`` is 1 for such a step (`fit` stops after a streak).
      augment: per-example augmentation ``(key, x) -> x`` (`jtricks.data.augment`), applied
        to every training batch with keys from ``fold_in(fold_in(state.key, step), 1)``;
        evaluation never sees it.
      mix: ``(kind, alpha, num_classes)`` for mixup/cutmix (`jtricks.data.augment.mix_batch`):
        inputs and labels are mixed and the loss gets soft labels.
      accumulate: gradient accumulation (T29): the batch is cut into ``accumulate`` equal
        micro-batches, run one after another in a `lax.scan` (only one micro-batch's
        activations live at a time), and the mean of their mean-loss gradients makes ONE
        optimizer update, which equals the update of the whole batch (without BatchNorm,
        whose statistics then see micro-batches). The batch size must be divisible by it.
      precision: ``"float32"`` or ``"bf16"`` (mixed precision, T29): the forward and backward
        passes run on bfloat16 copies of the parameters and inputs; the loss is taken in
        float32 from float32 logits; gradients, the optimizer state, the master parameters
        and BatchNorm statistics stay float32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}",
            param="precision",
        )
    accumulate = check_int("accumulate", accumulate, low=1)
    compute_dtype = PRECISIONS[precision]

    def forward(state, params, x, y, key):
        """Mean loss, logits and new BatchNorm statistics of one (micro-)batch."""
        if compute_dtype is not None:
            params = jax.tree.map(
                lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                params,
            )
            x = x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        logits, batch_stats = _apply(state, params, x, train=True, key=key)
        logits = logits.astype(jnp.float32)
        if compute_dtype is not None:  # keep the statistics' own dtype
            batch_stats = jax.tree.map(
                lambda n, o: n.astype(o.dtype), batch_stats, state.batch_stats
            )
        return jnp.mean(loss_fn(logits, y)), (logits, batch_stats)

    def gradients(state, x, y, key):
        if accumulate == 1:
            return jax.value_and_grad(lambda p: forward(state, p, x, y, key), has_aux=True)(
                state.params
            )
        if x.shape[0] % accumulate:
            raise ValueError(
                f"batch of {x.shape[0]} is not divisible into accumulate={accumulate} micro-batches"
            )
        xs = x.reshape(accumulate, x.shape[0] // accumulate, *x.shape[1:])
        ys = y.reshape(accumulate, y.shape[0] // accumulate, *y.shape[1:])

        def micro(carry, inp):
            grads_sum, loss_sum, stats = carry
            xm, ym, k = inp
            (loss, (logits, stats)), g = jax.value_and_grad(
                lambda p: forward(state.replace(batch_stats=stats), p, xm, ym, k), has_aux=True
            )(state.params)
            return (jax.tree.map(jnp.add, grads_sum, g), loss_sum + loss, stats), logits

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        keys = jax.random.split(key, accumulate)
        (grads, loss, stats), logits = jax.lax.scan(
            micro, (zeros, jnp.zeros((), jnp.float32), state.batch_stats), (xs, ys, keys)
        )
        grads = jax.tree.map(lambda g: g / accumulate, grads)
        logits = logits.reshape(x.shape[0], *logits.shape[2:])
        return (loss / accumulate, (logits, stats)), grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        x, y = batch
        dropout_key = jax.random.fold_in(state.key, state.step)
        if augment is not None or mix is not None:
            aug_key, mix_key = jax.random.split(jax.random.fold_in(dropout_key, 1))
            if augment is not None:
                x = jax.vmap(augment)(jax.random.split(aug_key, x.shape[0]), x)
            if mix is not None:
                kind, alpha, num_classes = mix
                x, y = mix_batch(mix_key, x, y, num_classes, kind=kind, alpha=alpha)

        (loss, (logits, batch_stats)), grads = gradients(state, x, y, dropout_key)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(accuracy(logits, y))}
        if skip_nonfinite:
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params = keep(params, state.params)
            opt_state = keep(opt_state, state.opt_state)
            batch_stats = keep(batch_stats, state.batch_stats)
            metrics["nonfinite"] = (~finite).astype(jnp.int32)
        lr = current_learning_rate(opt_state)  # the new state holds the rate this step used
        if lr is not None:
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        if norms:
            metrics["grad_norm"] = optax.tree.norm(grads)
        if update_norm:
            metrics["update_norm"] = optax.tree.norm(updates)
            metrics["param_norm"] = optax.tree.norm(params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
        )
        if state.ema_params is not None:  # Polyak averaging (kept when the step was skipped)
            new_state = new_state.replace(
                ema_params=optax.incremental_update(params, state.ema_params, 1.0 - state.ema_decay)
            )
        return new_state, metrics

    return train_step


def make_eval_step(
    loss_fn: LossFn = cross_entropy,
) -> Callable[[TrainState, Batch, jax.Array], Metrics]:
    """Build ``eval_step(state, (x, y), weight) -> sums``: evaluation mode (running
    BatchNorm statistics, no dropout), returning weighted sums ``loss_sum``,
    ``correct`` and ``count`` so that padded batches average exactly."""

    def eval_step(state: TrainState, batch: Batch, weight: jax.Array) -> Metrics:
        x, y = batch
        logits, _ = _apply(state, state.params, x, train=False, key=None)
        return {
            "loss_sum": jnp.sum(weight * loss_fn(logits, y)),
            "correct": jnp.sum(weight * accuracy(logits, y)),
            "count": jnp.sum(weight),
        }

    return eval_step


def _evaluate_batches(eval_step, state, xb, yb, wb) -> Metrics:
    def body(carry, batch):
        x, y, w = batch
        return jax.tree.map(jnp.add, carry, eval_step(state, (x, y), w)), None

    zero = {"loss_sum": jnp.zeros(()), "correct": jnp.zeros(()), "count": jnp.zeros(())}
    sums, _ = jax.lax.scan(body, zero, (xb, yb, wb))
    return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}


def make_epoch_fn(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    eval_step: Callable[[TrainState, Batch, jax.Array], Metrics] | None = None,
    batch_sharding: Any = None,
):
    """Compile ``run_epoch(state, x, y, data_key, epoch, offset, val, *, num_steps, batch_size)
    -> (state, metrics)``: one program per epoch, training and validation together.

    The epoch's batches are ``epoch_indices(fold_in(data_key, epoch), N, batch_size, N // batch_size)``;
    the call runs ``num_steps`` of them starting at batch ``offset`` (both traced, so a
    short last epoch or resuming mid-epoch does not recompile). Each loop iteration gathers its batch
    from the device-resident ``x, y``. Returned metrics are the epoch means of the
    step metrics, ``param_norm`` at the end of the epoch and, when ``val`` (padded
    batches from `pad_batches`) is given and ``eval_step`` was supplied,
    ``val_loss`` and ``val_accuracy`` (and ``val_ema_loss`` / ``val_ema_accuracy`` on the
    EMA parameters when the state keeps them). With a `jtricks.optim.fused` optimizer the
    parameters are `Flat` inside the epoch (one buffer per dtype group; the gradient comes
    out flat, the update runs on the buffers) and trees outside it. The state is donated, so its buffers are
    reused in place. One dispatch and one host transfer per epoch. With ``batch_sharding``
    (a `jax.sharding.NamedSharding` over a data axis) every batch is constrained to it, so
    the step runs data-parallel under GSPMD.
    """

    @partial(jax.jit, static_argnames=("batch_size",), donate_argnums=0)
    def run_epoch(state, x, y, data_key, epoch, offset, val=None, *, num_steps, batch_size: int):
        key = jax.random.fold_in(data_key, epoch)
        steps_per_epoch = x.shape[0] // batch_size
        idx = epoch_indices(key, x.shape[0], batch_size, steps_per_epoch)

        def step_at(state, i):
            b = idx[i]
            xb, yb = x[b], y[b]
            if batch_sharding is not None:  # data parallel: each device takes its slice
                xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
                yb = jax.lax.with_sharding_constraint(yb, batch_sharding)
            return train_step(state, (xb, yb))

        fused = is_fused(state.opt_state)
        if fused:  # fused optimizer: flat params (and EMA) for the whole epoch, one copy each way
            state = flat_train_state(state)
        shapes = jax.eval_shape(step_at, state, offset)[1]
        sums = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items() if k != "nonfinite"}
        flags = jnp.zeros(steps_per_epoch, jnp.int32) if "nonfinite" in shapes else None

        def body(j, carry):
            state, sums, flags = carry
            state, m = step_at(state, offset + j)
            flag = m.pop("nonfinite", None)
            sums = jax.tree.map(lambda s, v: s + v.astype(jnp.float32), sums, m)
            if flags is not None:
                flags = flags.at[j].set(flag)
            return state, sums, flags

        # the step count is traced, so a short last epoch (or a resumed one) reuses the program
        state, sums, flags = jax.lax.fori_loop(0, num_steps, body, (state, sums, flags))
        if fused:
            state = tree_train_state(state)
        metrics = {k: v / num_steps for k, v in sums.items()}
        if flags is not None:
            metrics["nonfinite"] = flags  # per step (first num_steps), for streaks across epochs
        if "param_norm" not in metrics:
            metrics["param_norm"] = optax.tree.norm(state.params)  # once, at the end of the epoch
        if val is not None and eval_step is not None:
            metrics.update(
                {f"val_{k}": v for k, v in _evaluate_batches(eval_step, state, *val).items()}
            )
            if state.ema_params is not None:
                ema = _evaluate_batches(eval_step, state.with_ema_params(), *val)
                metrics.update({f"val_ema_{k}": v for k, v in ema.items()})
        return state, metrics

    return run_epoch


def make_evaluate_fn(eval_step: Callable[[TrainState, Batch, jax.Array], Metrics]):
    """Compile ``evaluate(state, xb, yb, wb) -> {"loss", "accuracy"}`` over pre-batched,
    padded arrays ``(B, batch, ...)`` with weights ``wb`` (1 real, 0 padding)."""
    return jax.jit(partial(_evaluate_batches, eval_step))


def pad_batches(x: Any, y: Any, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cut ``(x, y)`` into ``ceil(N / batch_size)`` batches, zero-padding the last; also
    return the 0/1 weights that mark real examples. Shapes ``(B, batch_size, ...)``."""
    x, y = np.asarray(x), np.asarray(y)  # padded on the host: no small programs to compile
    n = x.shape[0]
    bs = min(batch_size, n)
    nb = -(-n // bs)
    pad = nb * bs - n
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    return (
        jnp.asarray(x.reshape(nb, bs, *x.shape[1:])),
        jnp.asarray(y.reshape(nb, bs)),
        jnp.asarray(w.reshape(nb, bs)),
    )
