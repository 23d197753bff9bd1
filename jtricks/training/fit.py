"""The fit loop: whole epochs on device, the Python side only logs and decides."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from jtricks.caches import jitted
from jtricks.data.imbalance import class_weights, one_balancing
from jtricks.data.stream import is_batch_sequence, is_stream, training_batches
from jtricks.errors import ConfigError, check_int
from jtricks.optim.fused import is_fused
from jtricks.tasks import Classification, Regression, Task, as_task
from jtricks.training import compiled as programs
from jtricks.training.arguments import check_key
from jtricks.training.compiled import StepOptions, compiled_steps
from jtricks.training.data_checks import (
    centered,
    check_data,
    host_targets,
    model_outputs,
    pad_batches,
)
from jtricks.training.distributed import as_mesh, is_sharded_mesh, like_state, place_state
from jtricks.training.history import Callback, History
from jtricks.training.loop import LoopHooks, record_value, run_loop
from jtricks.training.options import FitOptions
from jtricks.training.partial import check as check_partial
from jtricks.training.runs import Length, Run, array_run, prepare_validation, stream_run
from jtricks.training.state import (
    TrainState,
    check_eval_source,
    check_live,
    first_member,
    is_ensemble,
    unalias,
)
from jtricks.training.steps import LossFn
from jtricks.training.streaming import evaluate_stream


def fit(
    state: TrainState,
    train_data: Any,
    options: FitOptions | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    val_data: Any = None,
    data_key: jax.Array | None = None,
    callbacks: Sequence[Callback] = (),
    reporter: Any = None,
    stop: Any = None,
    data_state: Any = None,
    partial_epoch: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[TrainState, History]:
    """Train ``state`` on ``train_data`` for ``epochs`` epochs or ``steps`` optimizer steps.

    How it trains is a `FitOptions` (batch size, task, precision, mesh, ...: each field
    documented there), given as ``options`` and/or as keyword arguments, which replace
    its fields: ``fit(state, data, batch_size=100, epochs=5)``.

    In-memory data: each epoch is one compiled `lax.scan` of static length over ``N //
    batch_size`` mini-batches gathered on the device (the tail dropped), shuffled by
    ``fold_in(data_key, epoch)``, from ``state.step`` on: data order depends only on
    ``data_key`` and the step count. A stream (an iterable of host batches: Grain, a
    `jtricks.data.stream.BatchStream`) runs in compiled chunks, fed ahead of use; records
    hold its ``data_state``. After each epoch: validation, a record, the callbacks.

    The state is *consumed* (its buffers donated): continue from the one returned, or pass ``device_copy(state)`` (`jtricks.training.state.device_copy`) to keep yours.
    Args:
      state: from `create_train_state` (or an earlier `fit`), or stacked ensemble states.
      train_data: a batch pytree of arrays with a common leading axis N, or a stream.
      options: a `FitOptions`; keyword ``settings`` replace its fields.
      epochs, steps: how long; give exactly one.
      val_data: validation arrays or a re-iterable stream, evaluated every epoch.
      data_key: PRNG key of the data order; default ``fold_in(state.key, 1)`` (an
        ensemble's: member 0's key).
      callbacks: objects with ``on_epoch_end(record, state)`` (`Callback`), optionally
        ``on_steps``, ``on_interrupt``, ``on_train_end``.
      reporter: a progress reporter (`jtricks.training.progress.RichReporter`).
      stop: a flag read between compiled programs (`jtricks.training.preemption`): once
        set, the program in flight finishes, callbacks' ``on_interrupt(state, info)`` run,
        and `fit` returns with ``history.interrupted``; continuing trains exactly as if
        never stopped. Several processes agree on it (`AgreedStop`).
      data_state: a stream iterator's state from a record, to continue from.
      partial_epoch: ``history.interrupted["partial_epoch"]`` of a run stopped mid-epoch,
        so that epoch's record covers the steps before the stop too.

    Returns ``(final_state, history)``.

    Raises:
      ConfigError: bad options or data, before any training.
      StreamError: the stream failed mid-run; its ``state`` is the state reached.
    """
    check_live(state)
    hooks = LoopHooks.of(callbacks, reporter, stop)
    options = FitOptions.build(options, settings)
    member = first_member(state)
    check_eval_source(options.eval_params, member)
    options = _centered(_weigh_classes(options, train_data, member), train_data, val_data)
    mesh = _mesh(options.mesh, state)
    data_key = _data_key(data_key, member)
    length = Length(epochs, steps)
    run = _run(train_data, options, member, mesh, length, data_key, data_state)
    try:
        val_data = prepare_validation(val_data, run, member, options, mesh)
        state = unalias(state)  # each epoch donates the state: one buffer must not appear twice
        if mesh is not None:
            state = place_state(state, mesh)
        if partial_epoch is not None:
            partial_epoch = check_partial(partial_epoch, int(member.step), run.steps_per_epoch)
        hooks = dataclasses.replace(hooks, partial=partial_epoch)
        return run_loop(state, run, val_data, options, hooks)
    finally:
        run.close()
        if options.profile is not None:
            options.profile.close()


def _data_key(data_key: Any, member: TrainState) -> jax.Array:
    """The key of the data order: ``data_key`` checked, or by default ``fold_in(key, 1)``
    of ``member`` (an ensemble's member 0: the batches every member sees)."""
    if data_key is None:
        return _fold_in(member.key, 1)
    return check_key("data_key", data_key)


@jitted
def _fold_in(key: jax.Array, data: int) -> jax.Array:
    """`jax.random.fold_in` compiled: run op by op it took 0.2-0.4 ms of host time per
    `fit` call on the 2-core CPU (0.02 ms compiled), a tenth of a warm call's own cost."""
    return jax.random.fold_in(key, data)


def _run(train_data, options, member, mesh, length, data_key, data_state) -> Run:
    """The run of in-memory data (`array_run`) or of a stream (`stream_run`)."""
    if is_batch_sequence(train_data):  # a list of batches: a re-iterable stream
        train_data = training_batches(train_data)
    if is_stream(train_data):
        return stream_run(train_data, options, member, mesh, length, data_state)
    _stream_only(data_state=data_state, steps_per_epoch=options.steps_per_epoch)
    return array_run(train_data, options, member, mesh, length, data_key)


def _weigh_classes(options: FitOptions, train_data: Any, member: TrainState) -> FitOptions:
    """``options`` with its ``class_weight`` made per-class weights (the number of
    classes from the model's outputs, ``"balanced"`` from the training labels) and folded
    into its classification task."""
    spec, task = options.class_weight, options.task
    if spec is not None or options.sampler is not None:  # a task's offsets besides?
        one_balancing(spec, options.sampler, getattr(task, "logit_adjust", None))
    if spec is None:
        return options
    if not isinstance(task, Classification):
        raise ConfigError(
            f"class_weight works with the classification task; this task is {task.name!r}",
            param="class_weight",
        )
    if is_stream(train_data) or is_batch_sequence(train_data):
        if isinstance(spec, str | dict):
            raise ConfigError(
                f"class_weight={spec!r} needs the labels in memory; for a stream give one "
                "weight per class (jtricks.data.imbalance.class_weights(spec, labels, C))",
                param="class_weight",
            )
        labels, num_classes = None, len(spec)
    else:
        labels = host_targets(task.targets(train_data))
        num_classes = model_outputs(member, task, train_data, "training data").shape[-1]
    weights = tuple(float(w) for w in class_weights(spec, labels, num_classes))
    task = dataclasses.replace(task, class_weight=weights)
    return dataclasses.replace(options, task=task, class_weight=None)


def _centered(options: FitOptions, train_data: Any, val_data: Any) -> FitOptions:
    """``options`` with a regression task centered on in-memory training targets, or, for
    a stream, on the validation data's (`jtricks.training.data_checks.centered`), the
    same for every split it scores."""
    if not isinstance(options.task, Regression):
        return options
    if not is_stream(train_data):
        task = centered(options.task, train_data)
    elif val_data is None:
        return options
    else:
        try:
            task = centered(options.task, val_data)
        except ConfigError:  # refused with the validation data's own words, after
            return options
    return options if task is options.task else dataclasses.replace(options, task=task)


def _stream_only(**settings: Any) -> None:
    """Refuse a stream's settings for in-memory data, whose position is the step count."""
    for name, value in settings.items():
        if value is not None:
            raise ConfigError(
                f"{name}={value!r} is for a stream of batches; in-memory training data "
                "continues from the state's own step count (give the state fit returned)",
                param=name,
            )


def _mesh(mesh: Any, state: TrainState) -> Any:
    """`fit`'s ``mesh`` as a mesh; an ``fsdp`` mesh refuses the fused optimizer (flat
    buffers) and ensembles (stacked states)."""
    mesh = as_mesh(mesh)
    if not is_sharded_mesh(mesh):
        return mesh
    fused = is_fused(first_member(state).opt_state)
    if fused or is_ensemble(state):
        what = (
            "the fused optimizer keeps them in flat buffers"
            if fused
            else "an ensemble's states are stacked"
        )
        raise ConfigError(
            f"a mesh with an fsdp axis shards each parameter array; {what}: use a data-only "
            "mesh (or mesh=None)",
            param="mesh",
        )
    return mesh


def evaluate(
    state: TrainState,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    task: Task | str | None = None,
    batch_size: int = 1000,
    params: str = "auto",
    eval_batch_size: int | None = None,
) -> dict[str, float]:
    """The task's loss and metrics of ``state`` on ``data`` (any batch pytree, or a stream
    of batches: one pass, e.g. `jtricks.data.stream.SequentialBatches`) in evaluation
    mode; exact over the whole split for any ``batch_size`` (see `jtricks.tasks`), on the
    parameters ``state.evaluation_state(params)`` (``"auto"``, ``"train"`` or ``"ema"``).
    ``eval_batch_size`` is ``batch_size`` under `fit`'s name for it (give one of them)."""
    if eval_batch_size is not None:
        if batch_size not in (1000, eval_batch_size):
            raise ConfigError(
                f"give batch_size or eval_batch_size (the same thing), not both; got "
                f"batch_size={batch_size!r} and eval_batch_size={eval_batch_size!r}",
                param="eval_batch_size",
            )
        batch_size = eval_batch_size
    metrics = split_metrics(state, data, as_task(task, loss_fn), batch_size, params)
    loss = float(metrics.pop("loss"))
    return {"loss": loss, **{k: record_value(k, v) for k, v in metrics.items()}}


def split_metrics(
    state: TrainState, data: Any, task: Task, batch_size: int, params: str
) -> dict[str, Any]:
    """`evaluate`'s metrics as the arrays the evaluation program returns (NumPy), before
    they become a record's floats: array metrics (a confusion matrix) stay whole."""
    check_live(state)
    check_eval_source(params, first_member(state))
    if is_stream(data):
        task = centered(task, data)  # on the first batch's targets
        return evaluate_stream(compiled_steps(StepOptions(task=task))[1], state, data, params)
    data = check_data(first_member(state), task, data, "evaluation data")
    task = centered(task, data)
    batch_size = check_int("batch_size", batch_size, low=1)
    _, evaluate_fn = programs.compiled_functions(StepOptions(task=task))
    batches = like_state(pad_batches(data, batch_size), state.params)
    return jax.device_get(evaluate_fn(state, *batches, params))
