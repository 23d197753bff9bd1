"""The two kinds of `fit` run: in-memory data on the device (`array_run`, one program
per epoch or per part of a long epoch) and streams fed to compiled chunks
(`stream_run`); each gives the loop (`jtricks.training.loop`) a `Run`."""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.data.stream import is_stream, stream_length
from jtricks.errors import ConfigError, check_int
from jtricks.training import compiled as programs
from jtricks.training.compiled import StepOptions, check_options, compiled_steps
from jtricks.training.data_checks import as_arrays, check_data, check_like, model_outputs
from jtricks.training.distributed import (
    batch_sharding,
    check_batch,
    global_batch_array,
    replicate,
)
from jtricks.training.epoch import finish_fn, program_length
from jtricks.training.options import FitOptions
from jtricks.training.preemption import stop_requested
from jtricks.training.profile import Profile
from jtricks.training.steps import num_examples, pad_batches
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


@dataclass(frozen=True)
class Length:
    """How long a `fit` call trains: ``epochs`` or ``steps`` (exactly one is given)."""

    epochs: int | None
    steps: int | None

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ConfigError(
                f"give exactly one of epochs and steps; got epochs={self.epochs!r}, "
                f"steps={self.steps!r}"
            )


def array_run(
    train_data: Any,
    fit_options: FitOptions,
    member: Any,
    mesh: Any,
    length: Length,
    data_key: jax.Array,
    stop: Any = None,
) -> Run:
    """The in-memory path: the data on device, one compiled program per epoch, or per part
    of an epoch longer than ``chunk`` steps (`part_length`)."""
    options = fit_options.step_options()
    data = check_data(member, options.task, train_data, "training data")
    check_options(options.task, data, options.augment, options.mix)
    if mesh is not None:
        data_dev = jax.tree.map(lambda a: global_batch_array(a, mesh), data)
    else:
        data_dev = jax.tree.map(jnp.asarray, data)
    n = num_examples(data_dev)  # across processes: every process's shard
    batch_size = fit_options.batch_size
    if batch_size is None:
        raise ConfigError("batch_size is required for in-memory training data", param="batch_size")
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
    total = _total_steps(length, steps_per_epoch, int(member.step))
    options = complete_options(options, member, mesh, data)
    run_epoch, _ = programs.compiled_functions(options)
    eval_step = compiled_steps(options)[1]
    if mesh is not None:
        data_key = replicate(data_key, mesh)
    k = part_length(steps_per_epoch, fit_options.chunk)
    epochs = ArrayEpochs(
        run_epoch,
        data_dev,
        data_key,
        batch_size,
        k,
        steps_per_epoch,
        fit_options,
        options.eval_source,
        eval_step,
        stop,
    )
    parts = k < steps_per_epoch or fit_options.profile is not None
    return Run(steps_per_epoch, total, data, epochs, parts=parts)


@dataclass
class ArrayEpochs:
    """Runs `fit`'s in-memory epochs: ``(state, epoch, offset, num_steps, streak, val,
    on_part) -> (state, metrics)``, one program per epoch, or parts of at most
    ``part_steps`` steps ending in one epoch-end program (`run_parts`)."""

    run_epoch: Any
    data: Any
    data_key: jax.Array
    batch_size: int
    part_steps: int
    steps_per_epoch: int
    options: FitOptions
    eval_source: str
    eval_step: Any
    stop: Any = None

    def whole(self, state, epoch, offset, num_steps, streak, val):
        """Training and validation of ``num_steps`` steps in one program."""
        return self.run_epoch(
            state,
            self.data,
            self.data_key,
            np.int32(epoch),
            np.int32(offset),
            val,
            streak,
            np.int32(self.options.max_nonfinite),
            num_steps=np.int32(num_steps),
            length=program_length(num_steps, self.part_steps),
            batch_size=self.batch_size,
        )

    def part(self, state, acc, epoch, offset, n):
        """``n`` steps from batch ``offset`` added into ``acc``."""
        return self.run_epoch.part(
            state,
            acc,
            self.data,
            self.data_key,
            np.int32(epoch),
            np.int32(offset),
            np.int32(n),
            np.int32(self.options.max_nonfinite),
            length=program_length(n, self.part_steps),
            batch_size=self.batch_size,
        )

    def __call__(self, state, epoch, offset, num_steps, streak, val, on_part=None):
        profile = self.options.profile
        array_val = None if is_val_stream(val) else val
        start = epoch * self.steps_per_epoch + offset
        pieces = cut(start, num_steps, self.part_steps, profile)
        if len(pieces) == 1:
            with traced(profile, start, num_steps):
                state, metrics = self.whole(state, epoch, offset, num_steps, streak, array_val)
            if profile is not None:
                profile.after(start + num_steps, state)
        else:
            acc = self.run_epoch.part.init(state, self.data, self.batch_size, streak)
            state, acc, rows, cut_short = run_parts(
                lambda s, a, j, n: self.part(s, a, epoch, offset + j, n),
                state,
                acc,
                pieces,
                on_part,
                self.options.max_nonfinite,
                profile,
                start,
                self.stop,
            )
            if cut_short:  # stopped by a signal between parts: no epoch record
                return state, {"interrupted": True, "step_rows": rows, "partial": acc}
            metrics = finish_fn(self.eval_step, self.eval_source)(state, acc, array_val)
            if rows is not None:
                metrics["step_rows"] = rows
        add_stream_validation(metrics, self.eval_step, state, val, self.eval_source)
        return state, metrics


def cut(start: int, num_steps: int, k: int, profile: Profile | None) -> list[int]:
    """The parts of ``num_steps`` steps after ``start`` done: at most ``k`` each, and one
    step each around a profiled range (`Profile.pieces`)."""
    if profile is not None and profile.meets(start - 1, num_steps + 1):
        return profile.pieces(start, num_steps, k)
    return [min(k, num_steps - j) for j in range(0, num_steps, k)]


def traced(profile: Profile | None, start: int, n: int) -> Any:
    """The profiler's context around a dispatch of ``n`` steps after ``start`` done."""
    return contextlib.nullcontext() if profile is None else profile.before(start, n)


def run_parts(part, state, acc, pieces, on_part, max_nonfinite, profile, start, stop=None):
    """Dispatch an epoch's parts ``part(state, acc, j, n)`` (``n`` steps from the epoch's
    ``j``-th) one after another; each finished part goes to ``on_part`` once the next one
    is dispatched, so the device never waits for the host. Stops early once a part's
    streak of non-finite steps ends training, or when ``stop`` asks
    (`jtricks.training.preemption.stop_requested`). Returns the state, the accumulator,
    the last part's step rows (not yet handed out) and whether ``stop`` cut the epoch
    short."""
    pending, j = None, 0
    for i, n in enumerate(pieces):
        with traced(profile, start + j, n):
            state, acc = part(state, acc, j, n)
        if profile is not None:
            profile.after(start + j + n, state)
        j += n
        previous, pending = pending, (acc, acc.pop("rows", None))
        if previous is not None and part_done(previous, on_part, max_nonfinite):
            break  # diverged: every later step would be masked
        if i + 1 < len(pieces) and stop_requested(stop):
            return state, acc, pending[1], True
    return state, acc, pending[1], False


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


def _total_steps(length: Length, steps_per_epoch: int, start_step: int = 0) -> int:
    """The steps to run, checked to end within the int32 step counter."""
    epochs, steps = length.epochs, length.steps
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
    stream: Any,
    fit_options: FitOptions,
    member: Any,
    mesh: Any,
    length: Length,
    data_state: Any = None,
    stop: Any = None,
) -> Run:
    """The streaming path (`jtricks.training.streaming`): host batches fed to chunks."""
    options = fit_options.step_options()
    steps_per_epoch = fit_options.steps_per_epoch
    if steps_per_epoch is None:
        steps_per_epoch = stream_length(stream)
    if steps_per_epoch is None and length.steps is None:
        raise ConfigError(
            f"the training stream ({type(stream).__name__}) has no len(), so an epoch has no "
            "length: give steps_per_epoch, or steps instead of epochs",
            param="steps_per_epoch",
        )
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch or length.steps, low=1)
    start_step = int(member.step)
    total = _total_steps(length, steps_per_epoch, start_step)
    chunk, max_nonfinite, profile = (
        fit_options.chunk,
        fit_options.max_nonfinite,
        fit_options.profile,
    )
    feeder = Feeder(stream, depth=fit_options.prefetch, state=data_state)
    try:
        first = jax.tree.map(np.asarray, feeder.first)
        data = check_data(member, options.task, first, "the training stream's first batch")
        check_options(options.task, data, options.augment, options.mix)
        _check_stream_batch(
            num_examples(data) * jax.process_count(), fit_options.batch_size, options
        )
        check_batch(num_examples(data) // options.accumulate, mesh)
        k = default_chunk(first, steps_per_epoch) if chunk is None else chunk
        options = complete_options(options, member, mesh, data)
    except BaseException:
        feeder.close()
        raise
    feeder.start(chunk_plan(start_step, steps_per_epoch, total, k), k, chunk_sharding(mesh))
    train_step, eval_step = compiled_steps(options)
    epochs_fn = StreamEpochs(feeder, train_step, eval_step, options, profile, stop)
    max_streak = np.int32(max_nonfinite)

    def epoch(state, epoch, offset, num_steps, streak, val, on_part=None):
        start = epoch * steps_per_epoch + offset
        return epochs_fn(state, num_steps, streak, max_streak, val, on_part, start)

    parts = k < steps_per_epoch or profile is not None
    return Run(steps_per_epoch, total, data, epoch, close=feeder.close, parts=parts)


def prepare_validation(val_data: Any, run: Run, member, options: FitOptions, mesh) -> Any:
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
    check_data(member, options.task, val_data, "validation data")
    val_data = pad_batches(val_data, options.eval_batch_size)
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
