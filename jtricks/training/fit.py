"""The fit loop: whole epochs on device, the Python side only logs and decides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jtricks.data.stream import is_stream
from jtricks.errors import ConfigError, check_int
from jtricks.optim.fused import is_fused
from jtricks.tasks import Task, as_task
from jtricks.training import compiled as programs
from jtricks.training.compiled import StepOptions, compiled_steps
from jtricks.training.data_checks import check_data
from jtricks.training.distributed import as_mesh, is_sharded_mesh, like_state, place_state
from jtricks.training.history import Callback, History
from jtricks.training.loop import first_member, record_value, run_loop
from jtricks.training.partial import check as check_partial
from jtricks.training.preemption import AgreedStop
from jtricks.training.profile import Profile
from jtricks.training.runs import array_run, prepare_validation, stream_run
from jtricks.training.state import TrainState, check_eval_source, check_live, unalias
from jtricks.training.steps import (
    LossFn,
    is_ensemble,
    pad_batches,
)
from jtricks.training.streaming import (
    evaluate_stream,
)


def fit(
    state: TrainState,
    train_data: Any,
    *,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    val_data: Any = None,
    data_key: jax.Array | None = None,
    loss_fn: LossFn | None = None,
    task: Task | str | None = None,
    eval_batch_size: int = 1000,
    callbacks: Sequence[Callback] = (),
    reporter: Any = None,
    norms: bool = True,
    update_norm: bool = False,
    max_nonfinite: int = 20,
    augment: Any = None,
    mix: tuple[str, float] | None = None,
    accumulate: int = 1,
    precision: str = "float32",
    mesh: Any = "auto",
    eval_params: str = "auto",
    keep_finite: bool = True,
    steps_per_epoch: int | None = None,
    data_state: Any = None,
    chunk: int | None = None,
    prefetch: int = 2,
    unroll: int = 1,
    log_every_steps: int | None = None,
    profile: Profile | None = None,
    stop: Any = None,
    partial_epoch: dict[str, Any] | None = None,
) -> tuple[TrainState, History]:
    """Train ``state`` on ``train_data`` for ``epochs`` epochs or ``steps`` optimizer steps.

    In-memory data (arrays): each epoch is one compiled loop of static length (a
    `lax.scan`, so an accelerator runs it without a host round trip per step) over
    ``N // batch_size`` shuffled mini-batches (the tail batch is dropped) that are
    gathered on device; the shuffle of epoch ``e`` uses ``fold_in(data_key, e)``. With
    ``steps`` the last epoch may be partial. Training continues from ``state.step``: a
    state stopped mid-epoch resumes with the remaining batches of that epoch, so data
    order depends only on ``data_key`` and the step count.

    A stream (any other iterable of host batches, e.g. a Grain dataset or a
    `jtricks.data.stream.BatchStream`; see `jtricks.training.streaming`): batches are
    drawn from one ``iter(train_data)`` (a re-iterable stream that runs out starts a new
    pass), put on the device ahead of use and run in compiled chunks of ``chunk`` steps.
    Each batch is one optimizer update. An epoch is ``steps_per_epoch`` batches (default
    ``len(train_data)``; without either, ``steps`` is one epoch). Every record holds
    ``data_state``, the iterator's state after the epoch's last batch when it has one
    (`jtricks.data.stream.data_state`); pass it back as ``data_state`` to continue with
    the very next batch. A one-shot stream that runs out ends training
    (``history.stopped`` says so).

    After each epoch the validation split (if given) is evaluated, a record is appended
    to the history, and callbacks run.

    The state is *consumed*: its buffers are donated to the compiled epoch and updated in
    place, so continue from the state `fit` returns. A consumed state given again (to
    `fit` or `evaluate`) is refused with a `ConfigError` that says so; to keep the state
    you pass (e.g. a pretrained backbone's, or the initial parameters for a comparison),
    pass a copy: ``fit(device_copy(state), ...)`` (`jtricks.training.state.device_copy`).

    Args:
      state: from `create_train_state` (or an earlier `fit`); consumed (see above).
      train_data: a batch pytree of arrays (``(x, y)``, a dict, ...) with a common leading
        axis N, or a stream of such batches.
      batch_size: examples per step, ``1 <= batch_size <= N`` (arrays; a stream's batches
        are its own, and a given ``batch_size`` must match them).
      epochs: number of full passes; give exactly one of ``epochs`` and ``steps``.
      steps: number of optimizer steps to run in this call.
      val_data: optional validation data (arrays or a stream) evaluated every epoch.
      data_key: PRNG key for the data order; default ``fold_in(state.key, 1)``.
      loss_fn: per-example loss ``(logits, labels) -> (N,)``.
      eval_batch_size: batch size for evaluation (results do not depend on it).
      callbacks: objects with ``on_epoch_end(record, state)`` (see `Callback`).
      reporter: optional progress reporter (see `jtricks.training.progress.RichReporter`).
      norms: log the epoch mean of the gradient norm (``train_grad_norm``); the parameter
        norm at the end of each epoch is always logged (``train_param_norm``).
      update_norm: also log per-step update and parameter norms (costly on small models,
        see `make_train_step`).
      max_nonfinite: a step whose loss or gradient is NaN/inf, or whose update would
        overflow the parameters, is skipped (the state is kept) and counted in
        ``train_nonfinite``. After this many consecutive such steps training stops at
        once, inside the compiled epoch (the last record's ``step`` is where), and `fit`
        returns the last state that evaluated finite (``history.kept_step``; see
        ``keep_finite``); ``history.diverged`` is set and ``history.stopped`` says why.
        A record's ``initial_loss`` (epoch 1) is the untrained model's first-batch loss.
      keep_finite: keep on device a copy of the newest state that evaluated finite (the
        initial one, then every epoch end with finite validation loss, training loss and
        parameter norm, and a loss at most 10x ``initial_loss``) to return after divergence; ``False`` saves that memory and
        returns the state where training stopped.
      augment: per-example augmentation for training batches (`jtricks.data.augment`).
      mix: ``("mixup" | "cutmix", alpha)`` to mix training batches and their labels.
      accumulate: micro-batches of ``batch_size`` per optimizer update (gradient
        accumulation): each update sees ``batch_size * accumulate`` examples and equals one
        step on that larger batch; ``steps`` and ``epochs`` count updates. A stream's
        batch is one update, cut into ``accumulate`` micro-batches.
      precision: ``"float32"`` or ``"bf16"`` (compute in bfloat16, float32 master
        parameters and optimizer state; see `make_train_step`).
      mesh: ``"auto"`` (default): data-parallel over every visible device when there is
        more than one (`jtricks.training.distributed`); a `jax.sharding.Mesh` with a
        ``"data"`` and/or an ``"fsdp"`` axis, or its spec (``"data=4,fsdp=2"``,
        `parse_mesh`): batches split over both, parameters, optimizer state and
        BatchNorm statistics sharded along ``fsdp`` (`shard_spec`); or ``None`` to stay
        on one device. With several processes
        (`jax.distributed`), ``train_data`` is this process's shard (or stream of its
        rows of every batch) and the batch is global.
      eval_params: which parameters validation uses (``"auto"``, ``"train"``, ``"ema"``; see
        `TrainState.evaluation_state`): by default the optimizer's evaluation parameters
        where it declares them (schedule-free), else the training ones. Early stopping, the
        best checkpoint and the plateau schedule follow, since they read ``val_loss``.
      steps_per_epoch: a stream's epoch length in batches (default ``len(train_data)``).
      data_state: a stream iterator's state from a record (``record["data_state"]``) to
        continue from; ``None`` starts at the stream's beginning.
      chunk: steps per compiled program. A stream's chunks (default
        `jtricks.training.streaming.default_chunk`); in-memory data: an epoch longer than
        ``chunk`` steps (default `jtricks.training.runs.DEFAULT_PART`, 1000) runs in
        parts of equal static length, at most ``chunk`` each (the last part's extra
        steps masked), and the reporter's bar and the step records advance after each
        part, while the next part runs. The results do not depend on it.
      prefetch: chunks a stream reads and transfers ahead of use.
      unroll: training steps per iteration of the compiled loop (`lax.scan`'s
        ``unroll``): fewer loop iterations for a longer compilation; the results are the
        same.
      log_every_steps: keep a record of every N-th step (``loss``, ``lr``, ``grad_norm``,
        ``update_norm``, ``param_norm``, ``skipped`` and the task's metrics; steps
        numbered from 1 across calls, so a resumed run continues the sequence). The
        records are outputs of the compiled loop, moved to the host once per program
        (no per-step host round trip), and go to ``history.steps`` and to every
        callback's ``on_steps(records)``. The step then computes the update and
        parameter norms each step (a few percent of a small model's step, see
        ``benchmarks/bench_step_records.py``).
      profile: a `jtricks.training.profile.Profile`: trace its steps with
        `jax.profiler`, each step one annotated dispatch (a stream's: each chunk).
      stop: a flag read between compiled programs (epochs, parts of a long epoch, a
        stream's chunks; no per-step host round trip): a
        `jtricks.training.preemption.StopSignals` (SIGTERM / Ctrl-C), a
        `threading.Event` or a callable. Once it is set the program in flight finishes,
        no new one starts, every callback's ``on_interrupt(state, info)`` runs (a
        `Checkpointer` writes the state), ``on_train_end`` does not, and `fit` returns
        the state reached with ``history.interrupted`` (its ``step``); a partial epoch
        gets no record. Continuing from that state (``data_state=`` its ``data_state``
        for a stream, ``partial_epoch=`` its ``partial_epoch``) trains exactly as if
        never stopped. With several processes the flag is agreed on
        (`jtricks.training.preemption.AgreedStop`: one small all-gather between
        programs), so all stop after the same program.
      partial_epoch: ``history.interrupted["partial_epoch"]`` of a run stopped mid-epoch
        (`jtricks.training.partial`), given with the state it returned: the first
        epoch's record then averages its training metrics over the steps before the stop
        too, as the uninterrupted epoch's would. Without it that record covers only the
        steps after the stop.

    Returns:
      ``(final_state, history)``.

    Raises:
      ConfigError: on bad sizes, non-finite features, or labels outside the model's outputs,
        before any training (a stream's first batch is checked).
      StreamError: the stream failed mid-run; its ``state`` is the state reached.
    """
    check_live(state)
    task = as_task(task, loss_fn)
    member = first_member(state)
    check_eval_source(eval_params, member)
    mesh = _mesh(mesh, state)
    if stop is not None and jax.process_count() > 1:  # every process stops at one point
        stop = AgreedStop(stop)
    eval_batch_size = check_int("eval_batch_size", eval_batch_size, low=1)
    if (epochs is None) == (steps is None):
        raise ConfigError(
            f"give exactly one of epochs and steps; got epochs={epochs!r}, steps={steps!r}"
        )
    if data_key is None:
        data_key = jax.random.fold_in(state.key, 1)
    max_nonfinite = check_int("max_nonfinite", max_nonfinite, low=1)
    options = StepOptions(
        task=task, norms=norms, update_norm=update_norm, augment=augment,
        mix=None if mix is None else (mix[0], float(mix[1])), accumulate=accumulate,
        precision=precision, eval_source=eval_params, unroll=unroll, log_every=log_every_steps,
    )  # fmt: skip
    common = dict(member=member, mesh=mesh, epochs=epochs, steps=steps, batch_size=batch_size)
    if is_stream(train_data):
        run = stream_run(
            train_data, options, steps_per_epoch=steps_per_epoch, data_state=data_state,
            chunk=chunk, prefetch=prefetch, max_nonfinite=max_nonfinite, profile=profile,
            stop=stop, **common,
        )  # fmt: skip
    else:
        _stream_only(data_state=data_state, steps_per_epoch=steps_per_epoch)
        run = array_run(
            train_data, options, data_key=data_key, max_nonfinite=max_nonfinite, chunk=chunk,
            profile=profile, stop=stop, **common,
        )  # fmt: skip
    try:
        val_data = prepare_validation(val_data, run, member, task, eval_batch_size, mesh)
        state = unalias(state)  # each epoch donates the state: one buffer must not appear twice
        if mesh is not None:
            state = place_state(state, mesh)
        partial_epoch = check_partial(partial_epoch, int(member.step), run.steps_per_epoch)
        loop_args = (callbacks, reporter, max_nonfinite, keep_finite, stop, partial_epoch)
        return run_loop(state, run, val_data, *loop_args)
    finally:
        run.close()
        if profile is not None:
            profile.close()


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
    fused = is_fused(first_member(state).opt_state)
    if is_sharded_mesh(mesh) and (fused or is_ensemble(state)):
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
    check_live(state)
    task = as_task(task, loss_fn)
    check_eval_source(params, first_member(state))
    if is_stream(data):
        metrics = evaluate_stream(compiled_steps(StepOptions(task=task))[1], state, data, params)
        loss = float(metrics.pop("loss"))
        return {"loss": loss, **{k: record_value(k, v) for k, v in metrics.items()}}
    data = check_data(first_member(state), task, data, "evaluation data")
    batch_size = check_int("batch_size", batch_size, low=1)
    _, evaluate_fn = programs.compiled_functions(StepOptions(task=task))
    batches = like_state(pad_batches(data, batch_size), state.params)
    metrics = jax.device_get(evaluate_fn(state, *batches, params))
    loss = float(metrics.pop("loss"))
    return {"loss": loss, **{k: record_value(k, v) for k, v in metrics.items()}}
