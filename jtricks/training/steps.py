"""Pure train and eval steps over any batch pytree (the epoch loop is `jtricks.training.epoch`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jtricks.data.augment import augment_jointly, mix_batch
from jtricks.errors import ConfigError, check_int
from jtricks.optim import contract
from jtricks.optim.pipeline import current_learning_rate
from jtricks.tasks import Task, as_task, batch_sums, finalize, train_metrics
from jtricks.training import gradients as grad_lib
from jtricks.training.data_checks import num_examples
from jtricks.training.data_checks import pad_batches as pad_batches  # its old home
from jtricks.training.gradients import Batch, widen_floats
from jtricks.training.model import apply_model
from jtricks.training.state import (
    TrainState,
    average_stats,
    evaluation_states,
    is_ensemble,
    keep_frozen_stats,
)
from jtricks.trees import tree_norm

PRECISIONS = {"float32": None, "bf16": jnp.bfloat16}

Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def make_train_step(
    loss_fn: LossFn | None = None,
    *,
    task: Task | str | None = None,
    norms: bool = True,
    update_norm: bool = False,
    skip_nonfinite: bool = True,
    augment: Callable | None = None,
    mix: tuple[str, float] | None = None,
    num_classes: int | None = None,
    accumulate: int = 1,
    precision: str = "float32",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build ``train_step(state, batch, active=True) -> (state, metrics)`` for any batch pytree.

    One step: the model reads ``task.inputs(batch)`` in training mode with dropout key
    ``fold_in(state.key, state.step)``; the objective is the task's weighted mean loss
    (`jtricks.tasks`); then the gradient, the optax update and the new BatchNorm
    statistics. Metrics: the batch's ``loss``, the task's training metrics, the
    ``learning_rate`` when the optimizer state holds one, ``grad_norm`` with ``norms``,
    ``update_norm`` and ``param_norm`` with ``update_norm`` (off by default: they keep XLA
    from fusing the update into the parameter write, see ``benchmarks/bench_fit.py``).

    ``skip_nonfinite``: a step whose loss or gradient is NaN/inf, or whose update would
    overflow the parameters' norm, keeps the old parameters, optimizer state and BatchNorm
    statistics (the step still counts) and reports ``nonfinite = 1``; the compiled epoch
    stops on a streak. Unlike `optax.apply_if_finite` it also keeps the statistics,
    refuses overflowing updates, and reports each skip. ``active`` (a traced boolean)
    masks the step through the same select: the state comes back as it was, step count
    included, so a static-length loop (`jtricks.training.epoch.run_steps`) masks the
    steps past its count at no cost to the others.

    The other arguments are `jtricks.training.FitOptions` fields of the same names:
    ``augment`` (keys ``fold_in(fold_in(state.key, step), 1)``), ``mix`` (with the
    model's ``num_classes`` for its soft labels), ``accumulate`` (the batch cut into that
    many micro-batches in a `lax.scan`, each weighted ``sum_i w_i l_i / W`` so their
    summed gradients equal the whole batch's, for a model without BatchNorm: with it,
    each micro-batch normalises by its own statistics and updates them in turn) and
    ``precision`` (``"bf16"``: forward and backward on bfloat16 copies; loss, gradients,
    optimizer state, master parameters and statistics float32).
    """
    task = as_task(task, loss_fn)
    accumulate = check_int("accumulate", accumulate, low=1)
    forward = partial(grad_lib.forward, task, compute_dtype(precision))
    gradients = partial(grad_lib.gradients, forward, task, accumulate)

    def train_step(
        state: TrainState, batch: Batch, active: Any = True
    ) -> tuple[TrainState, Metrics]:
        dropout_key = jax.random.fold_in(state.key, state.step)
        if augment is not None or mix is not None:
            key = jax.random.fold_in(dropout_key, 1)
            batch = _augment_batch(task, batch, key, augment, mix, num_classes)
        (loss, (outputs, batch_stats)), grads = gradients(state, batch, dropout_key)
        batch_stats = keep_frozen_stats(state.frozen_stats, batch_stats, state.batch_stats)

        def value_fn(params):  # the same batch and randomness, for line searches
            return forward(state, params, batch, dropout_key, None)[0]

        updates, opt_state = contract.update(
            state.tx, grads, state.opt_state, state.params, value=loss, value_fn=value_fn
        )
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **train_metrics(task, outputs, batch)}
        new = _guard(
            skip_nonfinite,
            active,
            loss,
            grads,
            metrics,
            (params, opt_state, batch_stats),
            (state.params, state.opt_state, state.batch_stats),
        )
        metrics.update(_norms(new[1], grads, updates, new[0], norms, update_norm))
        return _advance(state, active, *new), metrics

    train_step.takes_active = True  # the compiled epoch masks steps through ``active``
    return train_step


def compute_dtype(precision: str) -> Any:
    """The compute dtype of a precision name (`PRECISIONS`: ``None`` for float32)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}",
            param="precision",
        )
    return PRECISIONS[precision]


def _guard(skip_nonfinite: bool, active: Any, loss, grads, metrics, new, old):
    """``new`` (parameters, optimizer state, statistics) where the step is kept, else
    ``old``: one select for a skipped step (non-finite, flagged in ``metrics``), a masked
    one (``active`` false), or both."""
    keep = active
    if skip_nonfinite:
        finite = _finite(loss, grads, new[0])
        keep = finite & active
        metrics["nonfinite"] = (~finite).astype(jnp.int32)
    if skip_nonfinite or active is not True:
        return select_tree(keep, new, old)
    return new


def _advance(state: TrainState, active: Any, params, opt_state, batch_stats) -> TrainState:
    """The state after a step (the count advances only when ``active``), with its Polyak
    average (EMA) of the parameters and statistics updated when it keeps one (kept as it
    was for a masked step)."""
    new_state = state.replace(
        step=state.step + jnp.asarray(active, jnp.int32),
        params=params,
        opt_state=opt_state,
        batch_stats=batch_stats,
    )
    if state.ema_params is not None:
        ema = optax.incremental_update(params, state.ema_params, 1.0 - state.ema_decay)
        new_state = new_state.replace(ema_params=select_tree(active, ema, state.ema_params))
    if state.ema_batch_stats is not None:
        ema = average_stats(batch_stats, state.ema_batch_stats, state.ema_decay)
        new_state = new_state.replace(
            ema_batch_stats=select_tree(active, ema, state.ema_batch_stats)
        )
    return new_state


def select_tree(keep: Any, new: Any, old: Any) -> Any:
    """``new`` where ``keep`` (a boolean scalar), else ``old``, leaf by leaf (two pytrees of
    one structure); ``new`` itself when ``keep`` is the literal ``True``."""
    if keep is True:
        return new
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)


def _finite(loss: jax.Array, grads: Any, params: Any) -> jax.Array:
    """Whether a step may be kept: a finite loss and gradient, and parameters whose norm
    did not overflow (|w| ~ 1e19 already squares to inf), so exploding runs keep usable
    parameters."""
    grad_norm = tree_norm(grads)  # shared with the grad_norm metric (one computation)
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(tree_norm(params))


def _norms(opt_state, grads, updates, params, norms: bool, update_norm: bool) -> Metrics:
    """The step's learning rate (when the optimizer state holds one: the rate this step
    used), gradient norm, and update and parameter norms, as asked."""
    metrics = {}
    lr = current_learning_rate(opt_state)
    if lr is not None:
        metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
    if norms:
        metrics["grad_norm"] = tree_norm(grads)
    if update_norm:
        metrics["update_norm"] = tree_norm(updates)
        metrics["param_norm"] = tree_norm(params)
    return metrics


def _augment_batch(task: Task, batch: Batch, key: jax.Array, augment, mix, num_classes) -> Batch:
    """Per-example augmentation of the model's input, then mixup/cutmix of inputs and targets."""
    aug_key, mix_key = jax.random.split(key)
    x = task.inputs(batch)
    keys = jax.random.split(aug_key, num_examples(batch))
    if augment is not None and task.dense_targets:  # class maps and mask move with the input
        y, mask = task.targets(batch), task.mask(batch)
        mask = jnp.ones(y.shape, jnp.float32) if mask is None else mask
        x, (y, mask) = jax.vmap(lambda k, *a: augment_jointly(augment, k, a[0], a[1:]))(
            keys, x, y, mask
        )
        batch = task.with_mask(task.with_targets(batch, y), mask)
    elif augment is not None:
        x = jax.vmap(augment)(keys, x)
    batch = task.with_inputs(batch, x)
    if mix is not None:
        kind, alpha = mix
        x, y = mix_batch(mix_key, x, task.targets(batch), num_classes, kind=kind, alpha=alpha)
        batch = task.with_targets(task.with_inputs(batch, x), y)
    return batch


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """``eval_step(state, batch, weight) -> sums``: evaluation mode (running BatchNorm
    statistics, no dropout), returning the task's weighted sums (`jtricks.tasks.batch_sums`)
    so that padded batches and any batch size give exact split metrics; ``metrics(sums)``
    turns the summed sums into the task's metrics."""

    task: Task

    def __call__(self, state: TrainState, batch: Batch, weight: jax.Array) -> Metrics:
        outputs, _ = apply_model(
            state, state.params, self.task.inputs(batch), train=False, key=None
        )
        task = self.task.using(state.hparams)
        return batch_sums(task, widen_floats(outputs), batch, weight)

    def metrics(self, sums: Metrics) -> Metrics:
        return finalize(self.task, sums)


@dataclasses.dataclass(frozen=True)
class EnsembleEvalStep:
    """`EvalStep` for stacked states (`is_ensemble`): every member's sums and those of the
    ensemble's prediction, ``task.combine`` of the members' outputs (the mean softmax for
    classification). ``metrics`` gives the ensemble's metrics and ``member_<metric>``
    arrays ``(M,)``."""

    task: Task

    def __call__(self, states: TrainState, batch: Batch, weight: jax.Array) -> Metrics:
        inputs = self.task.inputs(batch)

        def outputs(s):
            return widen_floats(apply_model(s, s.params, inputs, train=False, key=None)[0])

        return ensemble_sums(self.task, jax.vmap(outputs)(states), states.hparams, batch, weight)

    def metrics(self, sums: Metrics) -> Metrics:
        return ensemble_metrics(self.task, sums)


def ensemble_sums(task: Task, members: Any, hparams: Any, batch: Batch, weight: jax.Array):
    """The batch's sums of every member (its outputs ``members[i]``, its task
    hyper-parameters ``hparams``) and of the ensemble's prediction ``task.combine``."""
    per_member = jax.vmap(lambda o, h: batch_sums(task.using(h), o, batch, weight))(
        members, hparams
    )
    combined = batch_sums(task, task.combine(members), batch, weight)
    return {"ensemble": combined, "member": per_member}


def ensemble_metrics(task: Task, sums: Metrics) -> Metrics:
    """The ensemble's metrics and every member's as ``member_<metric>`` arrays ``(M,)``."""
    members = jax.vmap(lambda m: finalize(task, m))(sums["member"])
    return {**finalize(task, sums["ensemble"]), **{f"member_{k}": v for k, v in members.items()}}


def make_eval_step(loss_fn: LossFn | None = None, *, task: Task | str | None = None) -> EvalStep:
    """Build the `EvalStep` of a task (or of a loss, see `jtricks.tasks.as_task`)."""
    return EvalStep(as_task(task, loss_fn))


def evaluation_step(
    eval_step: EvalStep, state: TrainState, source: str = "auto"
) -> tuple[EvalStep | EnsembleEvalStep, TrainState]:
    """The step and state that evaluate ``state`` on the parameters
    ``state.evaluation_state(source)``: for stacked states, every member's and the
    ensemble's (`EnsembleEvalStep`)."""
    if is_ensemble(state) and isinstance(eval_step, EvalStep):
        eval_step = EnsembleEvalStep(eval_step.task)
    return eval_step, evaluation_states(state, source)


def evaluate_batches(
    eval_step: EvalStep, state: TrainState, batches: Batch, wb: jax.Array, source: str = "auto"
) -> Metrics:
    """The task's metrics over pre-batched, padded data ``(B, batch, ...)`` with weights ``wb``
    (for stacked states, the ensemble's and every member's: `EnsembleEvalStep`), on the
    parameters ``state.evaluation_state(source)`` (computed once, before the batches)."""
    eval_step, state = evaluation_step(eval_step, state, source)

    def body(carry, inp):
        batch, w = inp
        return jax.tree.map(jnp.add, carry, eval_step(state, batch, w)), None

    first = jax.tree.map(lambda a: a[0], (batches, wb))
    shapes = jax.eval_shape(eval_step, state, *first)
    zero = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes
    )
    sums, _ = jax.lax.scan(body, zero, (batches, wb))
    return eval_step.metrics(sums)


def make_evaluate_fn(eval_step: EvalStep):
    """Compile ``evaluate(state, batches, wb) -> metrics`` over pre-batched, padded data
    ``(B, batch, ...)`` with weights ``wb`` (1 real, 0 padding), from `pad_batches`;
    ``evaluate(state, batches, wb, source)`` picks the parameters (see `evaluate_batches`)."""
    return jax.jit(partial(evaluate_batches, eval_step), static_argnums=3)
