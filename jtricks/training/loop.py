"""`fit`'s machinery: the in-memory and streaming runs, and the epoch loop that
dispatches them, records, runs callbacks and watches for divergence."""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.data.stream import is_stream, stream_length
from jtricks.errors import ConfigError, check_int
from jtricks.training import compiled as programs
from jtricks.training.callbacks import StopTraining
from jtricks.training.compiled import StepOptions, check_options, compiled_steps
from jtricks.training.data_checks import as_arrays, check_data, check_like, model_outputs
from jtricks.training.distributed import (
    batch_sharding,
    check_batch,
    global_batch_array,
    replicate,
)
from jtricks.training.epoch import finish_fn, program_length
from jtricks.training.history import History
from jtricks.training.profile import Profile
from jtricks.training.state import TrainState
from jtricks.training.state import device_copy as _device_copy
from jtricks.training.steps import is_ensemble, num_examples, pad_batches
from jtricks.training.streaming import (
    Feeder,
    StreamEpochs,
    add_stream_validation,
    chunk_plan,
    chunk_sharding,
    default_chunk,
    is_val_stream,
    part_done,
)


@dataclass
class Run:
    """What `fit`'s loop needs of its data: the epoch length, the steps of this call, the
    host data for checks, and ``epoch(state, epoch, offset, num_steps, streak, val,
    on_part)``."""

    steps_per_epoch: int
    total_steps: int
    data: Any
    epoch: Any
    close: Any = lambda: None
    parts: bool = False
    """Whether an epoch runs as several programs (`fit`'s ``chunk``), reporting each
    finished part to the loop (progress, step records)."""


def complete_options(options: StepOptions, member, mesh, data) -> StepOptions:
    """The run's options with what depends on the model and the mesh: the model's class
    count (mixup needs it for its soft labels) and the batches' sharding."""
    num_classes = None
    if options.mix is not None:
        num_classes = model_outputs(member, options.task, data, "training data").shape[-1]
    sharding = None if mesh is None else batch_sharding(mesh)
    return dataclasses.replace(options, num_classes=num_classes, sharding=sharding)


def array_run(
    train_data, options: StepOptions, *, member, mesh, epochs, steps, batch_size, data_key,
    max_nonfinite, chunk=None, profile=None,
) -> Run:  # fmt: skip
    """The in-memory path: the data on device, one compiled program per epoch, or per part
    of an epoch longer than ``chunk`` steps (`part_length`)."""
    data = check_data(member, options.task, train_data, "training data")
    check_options(options.task, data, options.augment, options.mix)
    if mesh is not None:
        data_dev = jax.tree.map(lambda a: global_batch_array(a, mesh), data)
    else:
        data_dev = jax.tree.map(jnp.asarray, data)
    n = num_examples(data_dev)  # across processes: every process's shard
    if batch_size is None:
        raise ConfigError("batch_size is required for in-memory training data", param="batch_size")
    batch_size = check_int("batch_size", batch_size, low=1)
    accumulate = options.accumulate
    if batch_size * accumulate > n:
        raise ConfigError(
            f"batch_size * accumulate must be <= {n} (the training examples); "
            f"got {batch_size} * {accumulate}",
            param="batch_size",
        )
    check_batch(batch_size, mesh)
    batch_size *= accumulate  # examples per optimizer update; the step cuts it into micro-batches
    steps_per_epoch = n // batch_size
    total = _total_steps(epochs, steps, steps_per_epoch, int(member.step))
    options = complete_options(options, member, mesh, data)
    run_epoch, _ = programs.compiled_functions(options)
    eval_step = compiled_steps(options)[1]
    if mesh is not None:
        data_key = replicate(data_key, mesh)

    k = part_length(steps_per_epoch, chunk)
    finish = finish_fn(eval_step, options.eval_source)
    fixed = dict(batch_size=batch_size)

    def whole(state, epoch, offset, num_steps, streak, val):  # training and validation
        return run_epoch(
            state, data_dev, data_key, np.int32(epoch), np.int32(offset), val, streak,
            np.int32(max_nonfinite), num_steps=np.int32(num_steps),
            length=program_length(num_steps, k), **fixed,
        )  # fmt: skip

    def part(state, acc, epoch, offset, n):
        return run_epoch.part(
            state, acc, data_dev, data_key, np.int32(epoch), np.int32(offset), np.int32(n),
            np.int32(max_nonfinite), length=program_length(n, k), **fixed,
        )  # fmt: skip

    def epoch(state, epoch, offset, num_steps, streak, val, on_part=None):
        array_val = None if is_val_stream(val) else val
        start = epoch * steps_per_epoch + offset
        pieces = cut(start, num_steps, k, profile)
        if len(pieces) == 1:
            with traced(profile, start, num_steps):
                state, metrics = whole(state, epoch, offset, num_steps, streak, array_val)
            if profile is not None:
                profile.after(start + num_steps, state)
        else:
            acc = run_epoch.part.init(state, data_dev, batch_size, streak)
            state, acc, rows = run_parts(
                lambda s, a, j, n: part(s, a, epoch, offset + j, n), state, acc, pieces,
                on_part, max_nonfinite, profile, start,
            )  # fmt: skip
            metrics = finish(state, acc, array_val)
            if rows is not None:
                metrics["step_rows"] = rows
        add_stream_validation(metrics, eval_step, state, val, options.eval_source)
        return state, metrics

    return Run(
        steps_per_epoch, total, data, epoch, parts=k < steps_per_epoch or profile is not None
    )


def cut(start: int, num_steps: int, k: int, profile: Profile | None) -> list[int]:
    """The parts of ``num_steps`` steps after ``start`` done: at most ``k`` each, and one
    step each around a profiled range (`Profile.pieces`)."""
    if profile is not None and profile.meets(start - 1, num_steps + 1):
        return profile.pieces(start, num_steps, k)
    return [min(k, num_steps - j) for j in range(0, num_steps, k)]


def traced(profile: Profile | None, start: int, n: int) -> Any:
    """The profiler's context around a dispatch of ``n`` steps after ``start`` done."""
    return contextlib.nullcontext() if profile is None else profile.before(start, n)


def run_parts(part, state, acc, pieces, on_part, max_nonfinite, profile, start):
    """Dispatch an epoch's parts ``part(state, acc, j, n)`` (``n`` steps from the epoch's
    ``j``-th) one after another; each finished part goes to ``on_part`` once the next one
    is dispatched, so the device never waits for the host. Stops early once a part's
    streak of non-finite steps ends training. Returns the state, the accumulator and the
    last part's step rows (not yet handed out)."""
    pending, j = None, 0
    for n in pieces:
        with traced(profile, start + j, n):
            state, acc = part(state, acc, j, n)
        if profile is not None:
            profile.after(start + j + n, state)
        j += n
        previous, pending = pending, (acc, acc.pop("rows", None))
        if previous is not None and part_done(previous, on_part, max_nonfinite):
            break  # diverged: every later step would be masked
    return state, acc, pending[1]


DEFAULT_PART = 1000
"""An in-memory epoch longer than this many steps runs in equal parts of at most this
many (`part_length`), so progress and step records arrive during it."""


def part_length(steps_per_epoch: int, chunk: int | None = None) -> int:
    """The steps of one part of an in-memory epoch: the epoch cut into
    ``ceil(steps_per_epoch / chunk)`` parts as equal as possible (``chunk`` default
    `DEFAULT_PART`), so a full epoch masks fewer steps than it has parts. An epoch of at
    most ``chunk`` steps is one program, as before."""
    limit = DEFAULT_PART if chunk is None else check_int("chunk", chunk, low=1)
    parts = -(-steps_per_epoch // limit)
    return -(-steps_per_epoch // parts)


MAX_STEP = 2**31 - 1
"""The largest step count: `TrainState.step` is an int32 (what optax's counters use too)."""


def _total_steps(epochs, steps, steps_per_epoch, start_step: int = 0) -> int:
    """The steps to run, checked to end within the int32 step counter."""
    if steps is None:
        total = check_int("epochs", epochs, low=1, high=MAX_STEP) * steps_per_epoch
        name, value = "epochs", epochs
    else:
        total = check_int("steps", steps, low=1)
        name, value = "steps", steps
    if start_step + total > MAX_STEP:
        raise ConfigError(
            f"{name}={value!r} would run to step {start_step + total:,}; the step counter is "
            f"an int32, so a run ends by step {MAX_STEP:,} (2**31 - 1)",
            param=name,
        )
    return total


def stream_run(
    stream, options: StepOptions, *, member, mesh, epochs, steps, steps_per_epoch,
    batch_size, data_state, chunk, prefetch, max_nonfinite, profile=None,
) -> Run:  # fmt: skip
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
    start_step = int(member.step)
    total = _total_steps(epochs, steps, steps_per_epoch, start_step)
    feeder = Feeder(stream, depth=check_int("prefetch", prefetch, low=1), state=data_state)
    try:
        first = jax.tree.map(np.asarray, feeder.first)
        data = check_data(member, options.task, first, "the training stream's first batch")
        check_options(options.task, data, options.augment, options.mix)
        _check_stream_batch(num_examples(data) * jax.process_count(), batch_size, options)
        check_batch(num_examples(data) // options.accumulate, mesh)
        k = default_chunk(first, steps_per_epoch) if chunk is None else chunk
        k = check_int("chunk", k, low=1)
        options = complete_options(options, member, mesh, data)
    except BaseException:
        feeder.close()
        raise
    feeder.start(chunk_plan(start_step, steps_per_epoch, total, k), k, chunk_sharding(mesh))
    train_step, eval_step = compiled_steps(options)
    epochs_fn = StreamEpochs(feeder, train_step, eval_step, options, profile)

    def epoch(state, epoch, offset, num_steps, streak, val, on_part=None):
        start = epoch * steps_per_epoch + offset
        return epochs_fn(state, num_steps, streak, np.int32(max_nonfinite), val, on_part, start)

    parts = k < steps_per_epoch or profile is not None
    return Run(steps_per_epoch, total, data, epoch, close=feeder.close, parts=parts)


def prepare_validation(val_data: Any, run: Run, member, task, eval_batch_size: int, mesh) -> Any:
    """Validation data as the epochs take it: a re-iterable stream as it is (a one-shot
    iterator is refused before training, not at epoch 2); arrays checked against
    the model and the training data, cut into padded batches (`pad_batches`) and, with a
    mesh, replicated on it."""
    if isinstance(val_data, collections.abc.Iterator):  # a generator: one pass only
        raise ConfigError(
            f"val_data is a one-shot iterator ({type(val_data).__name__}): validation reads "
            "it after every epoch, and it would be empty from the second on; give "
            "something iter() restarts (a list of batches, a BatchStream, a Grain "
            "dataset) or arrays",
            param="val_data",
        )
    if val_data is None or is_stream(val_data):
        return val_data
    val_data = as_arrays(val_data, "validation data")
    check_like(val_data, run.data, "validation data")
    check_data(member, task, val_data, "validation data")
    val_data = pad_batches(val_data, check_int("eval_batch_size", eval_batch_size, low=1))
    return val_data if mesh is None else replicate(val_data, mesh)


def _check_stream_batch(n: int, batch_size: int | None, options: StepOptions) -> None:
    accumulate = options.accumulate
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


def run_loop(
    state: TrainState,
    run: Run,
    val: Any,
    callbacks: Any,
    reporter: Any,
    max_nonfinite: int,
    keep_finite: bool,
) -> tuple[TrainState, History]:
    """`fit`'s epoch loop: dispatch, record, callbacks, divergence."""
    history = History()
    start_step = int(first_member(state).step)
    total_steps, steps_per_epoch = run.total_steps, run.steps_per_epoch
    t0 = time.perf_counter()
    if reporter is not None:
        reporter.start(total_steps=total_steps, done=0)
    # Callbacks that only observe (``needs_state = False``) let the next epoch be dispatched
    # before this epoch's metrics are read, so the device never waits for Python.
    # An epoch run in parts already overlaps each part with the host's work on the last.
    pipelined = not run.parts and all(getattr(cb, "needs_state", True) is False for cb in callbacks)
    # the last state known to evaluate finite, kept on device; divergence ends with it
    keeper = _FiniteKeeper(enabled=keep_finite, always_copy=pipelined)

    def dispatch(state, done, streak):
        step = start_step + done
        epoch, offset = divmod(step, steps_per_epoch)
        num_steps = min(steps_per_epoch - offset, total_steps - done)
        keeper.starting(state)

        def on_part(acc, rows):  # a finished part of the epoch (an epoch run in parts)
            part = jax.device_get({"done": acc["done"], "loss": acc["sums"]["loss"]})
            deliver_steps(rows, history, callbacks)
            part_end = getattr(reporter, "part_end", None)
            if part_end is not None:
                loss = float(np.mean(part["loss"])) / max(int(part["done"]), 1)
                part_end(epoch=epoch + 1, loss=loss, done=done + int(part["done"]))

        state, metrics = run.epoch(state, epoch, offset, num_steps, streak, val, on_part)
        return state, Dispatched(metrics, epoch, step, num_steps, done, keeper.take_start())

    try:
        t_last = time.perf_counter()
        state, pending = dispatch(state, 0, np.int32(0))
        while pending is not None:
            upcoming = None
            if pipelined and pending.done_after < total_steps:
                state, upcoming = dispatch(state, pending.done_after, pending.metrics["streak"])
            keeper.started(pending.start)
            if pending.metrics is None:  # a one-shot stream ran out at an epoch's start
                history.stopped = _ran_out(history, pending.step)
                break
            record, streak, done, ended = _record(pending)
            deliver_steps(record.pop("step_rows", None), history, callbacks)
            now = time.perf_counter()
            record["steps_per_s"] = (record["step"] - pending.step) / (now - t_last)
            record["elapsed_s"] = now - t0
            t_last = now
            history.records.append(record)
            if reporter is not None:
                reporter.epoch_end(record, done=done)
            if "train_nonfinite" in record and streak >= max_nonfinite:
                state = _diverged(history, record, keeper, state, streak, record["step"])
                if upcoming is not None:  # the epoch already in flight is discarded
                    jax.block_until_ready(upcoming.metrics)
                for cb in callbacks:  # logs see the stopping epoch; the state is the kept one
                    cb.on_epoch_end(record, None if pipelined else state)
                break
            keeper.epoch_end(record, upcoming.start if upcoming is not None else None)
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
    except BaseException:
        _settle(callbacks)
        raise
    finally:
        if reporter is not None:
            reporter.close()
    return state, history


def deliver_steps(rows: Any, history: History, callbacks: Any) -> None:
    """A program's step records (`jtricks.training.epoch.StepLog`) into ``history.steps``
    and to every callback with an ``on_steps(records)`` method."""
    if rows is None:
        return
    records = step_records(rows)
    history.steps.extend(records)
    for cb in callbacks:
        on_steps = getattr(cb, "on_steps", None)
        if on_steps is not None and records:
            on_steps(records)


STEP_NAMES = {"learning_rate": "lr", "nonfinite": "skipped"}
STEP_ORDER = ("loss", "learning_rate", "grad_norm", "update_norm", "param_norm", "nonfinite")


def step_records(rows: Any) -> list[dict[str, Any]]:
    """Host records of a program's compacted step rows (`jtricks.training.epoch.run_steps`):
    ``{"step", "loss", "lr", "grad_norm", "update_norm", "param_norm", "skipped", ...}``
    per logged step (an ensemble's metrics as the mean over members, ``skipped`` the
    members that skipped it)."""
    rows = jax.device_get(rows)
    count, steps = int(rows.pop("count")), rows.pop("step")
    first = [k for k in STEP_ORDER if k in rows]
    keys = first + sorted(k for k in rows if k not in first)
    records = []
    for i in range(count):
        record: dict[str, Any] = {"step": int(steps[i])}
        for key in keys:
            values = rows[key]
            name = STEP_NAMES.get(key, key)
            value = values[i]
            record[name] = int(np.sum(value)) if key == "nonfinite" else record_value(name, value)
        records.append(record)
    return records


def _settle(callbacks) -> None:
    """After an exception or an interrupt inside `fit`: let every callback that writes in
    the background (a `Checkpointer`) finish what it started and release its threads, so
    the newest checkpoint is on disk and the process can exit. A failure of those writes
    does not hide the error being raised."""
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def _ran_out(history: History, step: int) -> str:
    return f"the training stream ran out at step {step}"


@dataclass
class Dispatched:
    """An epoch in flight: its ``metrics`` (device arrays until read), its ``epoch``, the
    global ``step`` it starts at, its ``num_steps``, the steps of this call ``done``
    before it, and the ``start`` state kept for divergence (`_FiniteKeeper`)."""

    metrics: Any
    epoch: int
    step: int
    num_steps: int
    done: int
    start: TrainState | None

    @property
    def done_after(self) -> int:
        return self.done + self.num_steps


def _record(pending: Dispatched):
    """An epoch's record from its metrics; also the streak, the steps done in the call and
    whether the stream ran out."""
    metrics, epoch, step = pending.metrics, pending.epoch, pending.step
    data_state = metrics.pop("data_state", None)
    ended = bool(metrics.pop("ended", False))
    step_rows = metrics.pop("step_rows", None)
    metrics = jax.device_get(metrics)
    steps_done = int(metrics.pop("steps_done"))
    streak = int(metrics.pop("streak"))
    first_loss = metrics.pop("first_loss")
    record: dict[str, Any] = {"epoch": epoch + 1, "step": step + steps_done}
    if step == 0:  # the untrained model's loss on the first batch, for the warning
        record["initial_loss"] = record_value("initial_loss", first_loss)
    flags = metrics.pop("nonfinite", None)
    for k, v in metrics.items():
        name = "lr" if k == "learning_rate" else k if k.startswith("val_") else f"train_{k}"
        record[name] = record_value(name, v)
    if flags is not None:
        record["train_nonfinite"] = int(flags)
    if data_state is not None:
        record["data_state"] = data_state
    if step_rows is not None:  # taken out by the loop before anyone sees the record
        record["step_rows"] = step_rows
    return record, streak, pending.done + steps_done, ended


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


def first_member(state: TrainState) -> TrainState:
    """Member 0 of stacked (ensemble) states; a single state itself."""
    return jax.tree.map(lambda a: a[0], state) if is_ensemble(state) else state


def record_value(name: str, value: Any) -> float | list[float]:
    """A metric for a record: a float; an ensemble's per-member training metrics become
    their mean, its ``member_*`` metrics a list (one value per member)."""
    if np.ndim(value) == 0:
        return float(value)
    if "member_" in name:
        return np.asarray(value, np.float64).tolist()
    return float(np.mean(value))
