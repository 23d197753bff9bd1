"""The fit loop: whole epochs on device, the Python side only logs and decides."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.data.stream import is_stream, stream_length
from jtricks.errors import ConfigError, check_int
from jtricks.tasks import Classification, LossTask, Task, as_task
from jtricks.training.callbacks import StopTraining
from jtricks.training.data_checks import check_data, check_like, model_outputs
from jtricks.training.distributed import (
    batch_sharding,
    check_batch,
    data_mesh,
    global_batch_array,
    like_state,
    replicate,
)
from jtricks.training.state import TrainState, check_eval_source, unalias
from jtricks.training.state import device_copy as _device_copy
from jtricks.training.steps import (
    LossFn,
    is_ensemble,
    make_epoch_fn,
    make_eval_step,
    make_evaluate_fn,
    make_train_step,
    num_examples,
    pad_batches,
)
from jtricks.training.streaming import (
    Feeder,
    StreamEpochs,
    add_stream_validation,
    chunk_plan,
    chunk_sharding,
    default_chunk,
    evaluate_stream,
    is_val_stream,
)


class Callback(Protocol):
    """Called on the Python side after every epoch's metrics are known.

    ``on_epoch_end`` receives the epoch's record (see `History`) and the current
    state. A callback that sets ``needs_state = False`` only observes records: it
    is passed ``None`` for the state, must not stop training, and lets `fit`
    dispatch the next epoch before reading this one's metrics. It returns ``None``/``False`` to go on, ``True`` to stop after this
    epoch, a `StopTraining` (stop, optionally continuing from its state), or a
    new `TrainState` to continue from (e.g. with a lowered learning rate). An
    optional ``on_train_end(state)`` runs after the last epoch and may return a
    replacement state (e.g. the best one). Callbacks run in order; each sees the state the previous
    one returned.
    """

    def on_epoch_end(
        self, record: dict[str, Any], state: TrainState
    ) -> bool | TrainState | None: ...


@dataclass
class History:
    """Per-epoch records of a `fit` call.

    Each record has ``epoch`` (1-based), ``step`` (optimizer steps so far), the
    epoch means of the step metrics prefixed ``train_`` (``train_loss``,
    ``train_accuracy``, ``train_grad_norm``, ...), ``val_loss`` and
    ``val_accuracy`` when a validation split is given, ``steps_per_s`` (the
    first epoch includes compilation) and ``elapsed_s`` since `fit` began, and
    ``lr``, the epoch's mean learning rate, when the optimizer state holds one
    (optimizers from `jtricks.optim.build_optimizer` do).

    ``history["val_loss"]`` returns that column as a NumPy array, ``history[-1]`` the
    last record. A stream's records also hold ``data_state`` (see `fit`).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    diverged: bool = False
    """Training stopped after ``max_nonfinite`` consecutive skipped steps."""
    kept_step: int | None = None
    """After divergence: the step of the state `fit` returned (the last that evaluated
    finite); ``records[-1]["step"]`` is where training stopped."""

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):  # one record: history[-1]
            return self.records[key]
        return np.asarray([r[key] for r in self.records])

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)


_CLASSIFICATION = Classification()


@functools.cache
def compiled_steps(
    task: Task = _CLASSIFICATION,
    norms: bool = True,
    update_norm: bool = False,
    augment: Any = None,
    mix: tuple | None = None,
    accumulate: int = 1,
    precision: str = "float32",
):
    """The ``(train_step, eval_step)`` pair of a task and options; cached, so the programs
    compiled from them (epochs, stream chunks) are shared by every `fit` call."""
    train_step = make_train_step(
        task=task,
        norms=norms,
        update_norm=update_norm,
        augment=augment,
        mix=mix,
        accumulate=accumulate,
        precision=precision,
    )
    return train_step, make_eval_step(task=task)


@functools.cache
def compiled_functions(
    task: Task = _CLASSIFICATION,
    norms: bool = True,
    update_norm: bool = False,
    augment: Any = None,
    mix: tuple | None = None,
    accumulate: int = 1,
    precision: str = "float32",
    batch_sharding: Any = None,
    eval_source: str = "auto",
):
    """The jitted ``(run_epoch, evaluate)`` pair; cached so repeated `fit` calls with the same
    task, options, model and optimizer compile once."""
    train_step, eval_step = compiled_steps(
        task, norms, update_norm, augment, mix, accumulate, precision
    )
    run_epoch = make_epoch_fn(train_step, eval_step, batch_sharding, eval_source)
    return run_epoch, make_evaluate_fn(eval_step)


def _check_options(task: Task, data: Any, augment: Any, mix: Any) -> None:
    """Refuse combinations of a task and a trick that cannot make sense."""
    if mix is not None and not isinstance(task, Classification | LossTask):
        raise ConfigError(
            f"mixup/cutmix mixes class labels; the {task.name} task has none", param="mix"
        )
    if augment is not None and not hasattr(task.inputs(data), "shape"):
        raise ConfigError(
            f"augment transforms one input array; the {task.name} task's model reads a "
            "structure of arrays",
            param="augment",
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
) -> tuple[TrainState, History]:
    """Train ``state`` on ``train_data`` for ``epochs`` epochs or ``steps`` optimizer steps.

    In-memory data (arrays): each epoch is one compiled `lax.while_loop` over
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

    Args:
      state: from `create_train_state` (or an earlier `fit`).
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
        ``"data"`` axis; or ``None`` to stay on one device. With several processes
        (`jax.distributed`), ``train_data`` is this process's shard (or stream of its
        rows of every batch) and the batch is global.
      eval_params: which parameters validation uses (``"auto"``, ``"train"``, ``"ema"``; see
        `TrainState.evaluation_state`): by default the optimizer's evaluation parameters
        where it declares them (schedule-free), else the training ones. Early stopping, the
        best checkpoint and the plateau schedule follow, since they read ``val_loss``.
      steps_per_epoch: a stream's epoch length in batches (default ``len(train_data)``).
      data_state: a stream iterator's state from a record (``record["data_state"]``) to
        continue from; ``None`` starts at the stream's beginning.
      chunk: a stream's steps per compiled program (default
        `jtricks.training.streaming.default_chunk`).
      prefetch: chunks a stream reads and transfers ahead of use.

    Returns:
      ``(final_state, history)``.

    Raises:
      ConfigError: on bad sizes, non-finite features, or labels outside the model's outputs,
        before any training (a stream's first batch is checked).
      StreamError: the stream failed mid-run; its ``state`` is the state reached.
    """
    task = as_task(task, loss_fn)
    member = first_member(state)
    check_eval_source(eval_params, member)
    mesh = data_mesh() if isinstance(mesh, str) and mesh == "auto" else mesh
    accumulate = check_int("accumulate", accumulate, low=1)
    eval_batch_size = check_int("eval_batch_size", eval_batch_size, low=1)
    if (epochs is None) == (steps is None):
        raise ConfigError(
            f"give exactly one of epochs and steps; got epochs={epochs!r}, steps={steps!r}"
        )
    if data_key is None:
        data_key = jax.random.fold_in(state.key, 1)
    max_nonfinite = check_int("max_nonfinite", max_nonfinite, low=1)
    options = dict(
        task=task, member=member, mesh=mesh, accumulate=accumulate, augment=augment, mix=mix
    )
    compiled = dict(norms=norms, update_norm=update_norm, precision=precision)
    compiled["eval_source"] = eval_params
    if is_stream(train_data):
        run = _stream_run(
            train_data, epochs, steps, steps_per_epoch, batch_size, data_state, chunk,
            prefetch, int(member.step), max_nonfinite, compiled, **options,
        )  # fmt: skip
    else:
        run = _array_run(
            train_data, epochs, steps, batch_size, data_key, max_nonfinite, compiled, **options
        )
    if val_data is not None and not is_stream(val_data):
        val_data = jax.tree.map(np.asarray, val_data)
        check_like(val_data, run.data, "validation data")
        check_data(member, task, val_data, "validation data")
        val_data = pad_batches(val_data, eval_batch_size)
    state = unalias(state)  # each epoch donates the state: one buffer must not appear twice
    if mesh is not None:
        state = replicate(state, mesh)
        if val_data is not None and not is_stream(val_data):
            val_data = replicate(val_data, mesh)
    try:
        return _loop(state, run, val_data, callbacks, reporter, max_nonfinite, keep_finite)
    finally:
        run.close()


@dataclass
class _Run:
    """What `fit`'s loop needs of its data: the epoch length, the steps of this call, the
    host data for checks, and ``epoch(state, epoch, offset, num_steps, streak, val)``."""

    steps_per_epoch: int
    total_steps: int
    data: Any
    epoch: Any
    close: Any = lambda: None


def _step_options(task, member, mesh, augment, mix, accumulate, data, compiled) -> tuple:
    """The arguments of `compiled_functions` for the run's options (mixup needs the
    model's class count)."""
    mix_full = None
    if mix is not None:
        num_classes = model_outputs(member, task, data, "training data").shape[-1]
        mix_full = (mix[0], float(mix[1]), num_classes)
    sharding = None if mesh is None else batch_sharding(mesh)
    return (
        task, compiled["norms"], compiled["update_norm"], augment, mix_full, accumulate,
        compiled["precision"], sharding, compiled["eval_source"],
    )  # fmt: skip


def _array_run(
    train_data, epochs, steps, batch_size, data_key, max_nonfinite, compiled, *,
    task, member, mesh, accumulate, augment, mix,
) -> _Run:  # fmt: skip
    """The in-memory path: the data on device, one compiled program per epoch."""
    data = check_data(member, task, train_data, "training data")
    _check_options(task, data, augment, mix)
    if mesh is not None:
        data_dev = jax.tree.map(lambda a: global_batch_array(a, mesh), data)
    else:
        data_dev = jax.tree.map(jnp.asarray, data)
    n = num_examples(data_dev)  # across processes: every process's shard
    if batch_size is None:
        raise ConfigError("batch_size is required for in-memory training data", param="batch_size")
    batch_size = check_int("batch_size", batch_size, low=1)
    if batch_size * accumulate > n:
        raise ConfigError(
            f"batch_size * accumulate must be <= {n} (the training examples); "
            f"got {batch_size} * {accumulate}",
            param="batch_size",
        )
    check_batch(batch_size, mesh)
    batch_size *= accumulate  # examples per optimizer update; the step cuts it into micro-batches
    steps_per_epoch = n // batch_size
    total = _total_steps(epochs, steps, steps_per_epoch)
    key = _step_options(task, member, mesh, augment, mix, accumulate, data, compiled)
    run_epoch, _ = compiled_functions(*key)
    eval_step = compiled_steps(*key[:7])[1]
    if mesh is not None:
        data_key = replicate(data_key, mesh)

    def epoch(state, epoch, offset, num_steps, streak, val):
        state, metrics = run_epoch(
            state,
            data_dev,
            data_key,
            np.int32(epoch),
            np.int32(offset),
            None if is_val_stream(val) else val,
            streak,
            np.int32(max_nonfinite),
            num_steps=np.int32(num_steps),
            batch_size=batch_size,
        )
        add_stream_validation(metrics, eval_step, state, val, key[8])
        return state, metrics

    return _Run(steps_per_epoch, total, data, epoch)


def _total_steps(epochs, steps, steps_per_epoch) -> int:
    if steps is None:
        return check_int("epochs", epochs, low=1) * steps_per_epoch
    return check_int("steps", steps, low=1)


def _stream_run(
    stream, epochs, steps, steps_per_epoch, batch_size, data_state, chunk, prefetch,
    start_step, max_nonfinite, compiled, *, task, member, mesh, accumulate, augment, mix,
) -> _Run:  # fmt: skip
    """The streaming path (`jtricks.training.streaming`): host batches fed to chunks."""
    if steps_per_epoch is None:
        steps_per_epoch = stream_length(stream)
    if steps_per_epoch is None and steps is None:
        raise ConfigError(
            f"the training stream ({type(stream).__name__}) has no len(), so an epoch has no "
            "length: give steps_per_epoch, or steps instead of epochs",
            param="steps_per_epoch",
        )
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch or steps, low=1)
    total = _total_steps(epochs, steps, steps_per_epoch)
    feeder = Feeder(stream, depth=check_int("prefetch", prefetch, low=1), state=data_state)
    try:
        first = jax.tree.map(np.asarray, feeder.first)
        data = check_data(member, task, first, "the training stream's first batch")
        _check_options(task, data, augment, mix)
        _check_stream_batch(num_examples(data) * jax.process_count(), batch_size, accumulate)
        check_batch(num_examples(data) // accumulate, mesh)
        k = default_chunk(first, steps_per_epoch) if chunk is None else chunk
        k = check_int("chunk", k, low=1)
        key = _step_options(task, member, mesh, augment, mix, accumulate, data, compiled)
    except BaseException:
        feeder.close()
        raise
    feeder.start(chunk_plan(start_step, steps_per_epoch, total, k), k, chunk_sharding(mesh))
    train_step, eval_step = compiled_steps(*key[:7])
    epochs_fn = StreamEpochs(feeder, train_step, eval_step, key[7], key[8])

    def epoch(state, epoch, offset, num_steps, streak, val):
        return epochs_fn(state, num_steps, streak, np.int32(max_nonfinite), val)

    return _Run(steps_per_epoch, total, data, epoch, close=feeder.close)


def _check_stream_batch(n: int, batch_size: int | None, accumulate: int) -> None:
    if batch_size is not None and check_int("batch_size", batch_size, low=1) != n:
        raise ConfigError(
            f"batch_size={batch_size} but the training stream's batches hold {n} examples",
            param="batch_size",
        )
    if n % accumulate:
        raise ConfigError(
            f"the training stream's batches of {n} cannot be cut into accumulate={accumulate} "
            "equal micro-batches",
            param="accumulate",
        )


def _loop(state, run, val, callbacks, reporter, max_nonfinite, keep_finite):
    """`fit`'s epoch loop: dispatch, record, callbacks, divergence."""
    history = History()
    start_step = int(first_member(state).step)
    total_steps, steps_per_epoch = run.total_steps, run.steps_per_epoch
    t0 = time.perf_counter()
    if reporter is not None:
        reporter.start(total_steps=total_steps, done=0)
    # Callbacks that only observe (``needs_state = False``) let the next epoch be dispatched
    # before this epoch's metrics are read, so the device never waits for Python.
    pipelined = all(getattr(cb, "needs_state", True) is False for cb in callbacks)
    # the last state known to evaluate finite, kept on device; divergence ends with it
    keeper = _FiniteKeeper(enabled=keep_finite, always_copy=pipelined)

    def dispatch(state, done, streak):
        step = start_step + done
        epoch, offset = divmod(step, steps_per_epoch)
        num_steps = min(steps_per_epoch - offset, total_steps - done)
        keeper.starting(state)
        state, metrics = run.epoch(state, epoch, offset, num_steps, streak, val)
        return state, (metrics, epoch, step, num_steps, done, keeper.take_start())

    try:
        t_last = time.perf_counter()
        state, pending = dispatch(state, 0, np.int32(0))
        while pending is not None:
            upcoming = None
            if pipelined and pending[4] + pending[3] < total_steps:
                state, upcoming = dispatch(state, pending[4] + pending[3], pending[0]["streak"])
            metrics, epoch, step, _, done_before, start = pending
            keeper.started(start)
            if metrics is None:  # a one-shot stream ran out at an epoch's start
                history.stopped = _ran_out(history, start_step + done_before)
                break
            record, streak, done, ended = _record(metrics, epoch, step, done_before)
            now = time.perf_counter()
            record["steps_per_s"] = (record["step"] - step) / (now - t_last)
            record["elapsed_s"] = now - t0
            t_last = now
            history.records.append(record)
            if reporter is not None:
                reporter.epoch_end(record, done=done)
            if "train_nonfinite" in record and streak >= max_nonfinite:
                state = _diverged(history, record, keeper, state, streak, record["step"])
                if upcoming is not None:  # the epoch already in flight is discarded
                    jax.block_until_ready(upcoming[0])
                for cb in callbacks:  # logs see the stopping epoch; the state is the kept one
                    cb.on_epoch_end(record, None if pipelined else state)
                break
            keeper.epoch_end(record, upcoming[5] if upcoming is not None else None)
            state, stop = _run_callbacks(callbacks, record, state, history, pipelined)
            if ended and not stop:
                history.stopped = record["stopped"] = _ran_out(history, record["step"])
                stop = True
            if stop:
                break
            if pipelined:
                pending = upcoming
            elif done < total_steps:
                state, pending = dispatch(state, done, np.int32(streak))
            else:
                pending = None
        for cb in callbacks:
            end = getattr(cb, "on_train_end", None)
            out = end(state) if end is not None and not pipelined else None
            if isinstance(out, TrainState):
                state = out
    finally:
        if reporter is not None:
            reporter.close()
    return state, history


def _ran_out(history: History, step: int) -> str:
    return f"the training stream ran out at step {step}"


def _record(metrics, epoch: int, step: int, done_before: int):
    """An epoch's record from its metrics; also the streak, the steps done in the call and
    whether the stream ran out."""
    data_state = metrics.pop("data_state", None)
    ended = bool(metrics.pop("ended", False))
    metrics = jax.device_get(metrics)
    steps_done = int(metrics.pop("steps_done"))
    streak = int(metrics.pop("streak"))
    first_loss = metrics.pop("first_loss")
    record: dict[str, Any] = {"epoch": epoch + 1, "step": step + steps_done}
    if step == 0:  # the untrained model's loss on the first batch, for the warning
        record["initial_loss"] = _record_value("initial_loss", first_loss)
    flags = metrics.pop("nonfinite", None)
    for k, v in metrics.items():
        name = "lr" if k == "learning_rate" else k if k.startswith("val_") else f"train_{k}"
        record[name] = _record_value(name, v)
    if flags is not None:
        record["train_nonfinite"] = int(flags)
    if data_state is not None:
        record["data_state"] = data_state
    return record, streak, done_before + steps_done, ended


def _run_callbacks(callbacks, record, state, history, pipelined):
    """Run the callbacks on an epoch's record; returns the state to continue from and
    whether to stop."""
    stop = False
    for cb in callbacks:
        out = cb.on_epoch_end(record, None if pipelined else state)
        if isinstance(out, TrainState):
            state = out
        elif isinstance(out, StopTraining):
            state = out.state if out.state is not None else state
            history.stopped = record["stopped"] = out.reason or type(cb).__name__
            stop = True
        elif out:
            stop = True
    if stop and pipelined:
        raise RuntimeError("a callback with needs_state=False must not stop training")
    return state, stop


class _FiniteKeeper:
    """Keeps on device the newest state that evaluated finite: the initial one, then the
    end of every epoch whose record is finite and sane (`_finite_record`). A state is copied before
    the epoch that would donate it only when it may be needed (always when epochs are
    pipelined, since the next one is dispatched before this one's record is read)."""

    def __init__(self, *, enabled: bool, always_copy: bool) -> None:
        self.enabled, self.always_copy = enabled, always_copy
        self.good: TrainState | None = None
        self.initial_loss: float | None = None
        self._promote_next = False
        self._start: TrainState | None = None

    def starting(self, state: TrainState) -> None:
        wanted = self.always_copy or self._promote_next or self.good is None
        self._start = _device_copy(state) if self.enabled and wanted else None

    def take_start(self) -> TrainState | None:
        start, self._start = self._start, None
        return start

    def started(self, start: TrainState | None) -> None:
        if start is not None and (self.good is None or self._promote_next):
            self.good, self._promote_next = start, False

    def epoch_end(self, record: dict[str, Any], upcoming_start: TrainState | None) -> None:
        self.initial_loss = record.get("initial_loss", self.initial_loss)
        if not _finite_record(record, self.initial_loss):
            return
        if upcoming_start is not None:
            self.good = upcoming_start
        else:
            self._promote_next = True


def _finite_record(record: dict[str, Any], initial_loss: float | None = None) -> bool:
    """Whether an epoch's end state evaluated finite and sane: its validation loss (when
    there is one), its parameter norm and the epoch's training loss are finite, and its
    loss is at most 10x the untrained model's (``initial_loss``, when known) - an
    exploded state whose loss is merely huge is not worth keeping."""
    keys = ("val_loss", "train_param_norm", "train_loss")
    if not all(np.all(np.isfinite(record[k])) for k in keys if k in record):
        return False
    loss = record.get("val_loss", record.get("train_loss"))
    return initial_loss is None or loss is None or float(np.mean(loss)) <= 10 * initial_loss


def _diverged(history, record, keeper, state, streak: int, end_step: int) -> TrainState:
    """Mark the run diverged and return the state it ends with: the kept finite one."""
    kept = keeper.good if keeper.enabled and keeper.good is not None else state
    history.diverged = record["diverged"] = True
    history.kept_step = int(np.ravel(jax.device_get(kept.step))[0])
    history.stopped = record["stopped"] = (
        f"{streak} consecutive steps had a non-finite loss or gradient or overflowed the "
        f"parameters (up to step {end_step}); training stopped there and kept the state of "
        f"step {history.kept_step}, the last whose loss was finite and at most 10x the "
        "untrained model's"
    )
    return kept


def evaluate(
    state: TrainState,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    task: Task | str | None = None,
    batch_size: int = 1000,
    params: str = "auto",
) -> dict[str, float]:
    """The task's loss and metrics of ``state`` on ``data`` (any batch pytree, or a stream
    of batches: one pass, e.g. `jtricks.data.stream.SequentialBatches`) in evaluation
    mode; exact over the whole split for any ``batch_size`` (see `jtricks.tasks`), on the
    parameters ``state.evaluation_state(params)`` (``"auto"``, ``"train"`` or ``"ema"``)."""
    task = as_task(task, loss_fn)
    check_eval_source(params, first_member(state))
    if is_stream(data):
        metrics = evaluate_stream(compiled_steps(task)[1], state, data, params)
        loss = float(metrics.pop("loss"))
        return {"loss": loss, **{k: _record_value(k, v) for k, v in metrics.items()}}
    data = check_data(first_member(state), task, data, "evaluation data")
    batch_size = check_int("batch_size", batch_size, low=1)
    _, evaluate_fn = compiled_functions(task)
    batches = like_state(pad_batches(data, batch_size), state.params)
    metrics = jax.device_get(evaluate_fn(state, *batches, params))
    loss = float(metrics.pop("loss"))
    return {"loss": loss, **{k: _record_value(k, v) for k, v in metrics.items()}}


def first_member(state: TrainState) -> TrainState:
    """Member 0 of stacked (ensemble) states; a single state itself."""
    return jax.tree.map(lambda a: a[0], state) if is_ensemble(state) else state


def _record_value(name: str, value: Any) -> float | list[float]:
    """A metric for a record: a float; an ensemble's per-member training metrics become
    their mean, its ``member_*`` metrics a list (one value per member)."""
    if np.ndim(value) == 0:
        return float(value)
    if "member_" in name:
        return np.asarray(value, np.float64).tolist()
    return float(np.mean(value))
