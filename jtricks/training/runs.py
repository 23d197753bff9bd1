"""The sources of `fit`'s training data: in-memory arrays on the device (`array_run`) and
streams fed to compiled chunks (`stream_run`). Each checks its data once, where they
enter, and gives the loop (`jtricks.training.loop`) a `Run`: the epoch length, the
steps of the call, the run's one part program (`jtricks.training.compiled.part_program`)
and, per epoch, its `Part` s (the program inputs of static length)."""

from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.data.batching import class_balanced
from jtricks.data.stream import is_stream, short_last_batch, stream_length
from jtricks.errors import ConfigError, check_int
from jtricks.training import compiled as programs
from jtricks.training.compiled import compiled_steps
from jtricks.training.data_checks import (
    as_arrays,
    check_data,
    check_like,
    check_options,
    host_targets,
    model_outputs,
    num_examples,
    pad_batches,
)
from jtricks.training.distributed import (
    batch_sharding,
    check_batch,
    global_batch_array,
    replicate,
)
from jtricks.training.epoch import ArrayFeed, ChunkFeed, program_length
from jtricks.training.options import FitOptions, StepOptions
from jtricks.training.profile import Profile
from jtricks.training.streaming import Feeder, chunk_plan, chunk_sharding, default_chunk


@dataclass(frozen=True)
class Part:
    """One dispatch of an epoch: the program's ``feed`` (`ArrayFeed` / `ChunkFeed`), its
    real ``steps`` and the program's static ``length``; a stream's part also carries
    the iterator's ``data_state`` after its last batch."""

    feed: Any
    steps: int
    length: int
    data_state: Any = None


@dataclass
class Run:
    """What `fit`'s loop needs of its data: the epoch length, the steps of this call, the
    host data (or first batch) for checks, the part ``program``, ``parts(epoch, offset,
    num_steps)`` (the `Part` s of that much of an epoch; a stream's may end early), the
    evaluation step for stream validation and ``close``."""

    steps_per_epoch: int
    total_steps: int
    data: Any
    program: Any
    parts: Callable[[int, int, int], Iterator[Part]]
    eval_step: Any
    eval_source: str
    close: Callable[[], None] = lambda: None
    split: bool = False
    """Whether an epoch runs as several programs (`fit`'s ``chunk``, a profile), each
    finished part reported to the loop (progress, step records)."""


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
) -> Run:
    """The in-memory source: the data checked and put on the device once; an epoch is one
    program, or parts of at most ``chunk`` steps (`part_length`) when it is longer."""
    options = fit_options.step_options()
    data = check_data(member, options.task, train_data, "training data")
    check_options(options.task, data, options.augment, options.mix)
    if mesh is not None:
        data_dev = jax.tree.map(lambda a: global_batch_array(a, mesh), data)
        data_key = replicate(data_key, mesh)
    else:
        data_dev = jax.tree.map(jnp.asarray, data)
    batch_size = _update_size(fit_options, num_examples(data_dev), mesh)
    steps_per_epoch = num_examples(data_dev) // batch_size
    total = _total_steps(length, steps_per_epoch, int(member.step))
    options = complete_options(options, member, mesh, data)
    k = part_length(steps_per_epoch, fit_options.chunk)
    sampling = _sampling(fit_options, data, mesh)
    profile = fit_options.profile
    parts = ArrayParts(
        data_dev, data_key, batch_size, k, steps_per_epoch, profile, sampling, whole=total >= k
    )
    split = k < steps_per_epoch or fit_options.profile is not None
    eval_step = compiled_steps(options)[1]
    program = programs.part_program(options)
    source = options.eval_source
    return Run(steps_per_epoch, total, data, program, parts, eval_step, source, split=split)


def _sampling(options: FitOptions, data: Any, mesh: Any) -> jax.Array | None:
    """The sampler's per-example probabilities on the device (replicated over a mesh),
    or ``None`` for shuffled epochs."""
    if options.sampler is None:
        return None
    if jax.process_count() > 1:
        raise ConfigError(
            "sampler='balanced' counts the classes of the whole training set; with several "
            "processes each holds a shard: use class_weight='balanced' instead",
            param="sampler",
        )
    probabilities = class_balanced(host_targets(options.task.targets(data)))
    return replicate(probabilities, mesh) if mesh is not None else jnp.asarray(probabilities)


def _update_size(options: FitOptions, n: int, mesh: Any) -> int:
    """Examples per optimizer update (``batch_size * accumulate``; the step cuts them into
    micro-batches), checked against the ``n`` training examples and the mesh."""
    batch_size, accumulate = options.batch_size, options.accumulate
    if batch_size is None:
        raise ConfigError("batch_size is required for in-memory training data", param="batch_size")
    if batch_size * accumulate > n:
        raise ConfigError(
            f"batch_size * accumulate must be <= {n} (the training examples); "
            f"got {batch_size} * {accumulate}",
            param="batch_size",
        )
    if mesh is not None:
        check_batch(batch_size, mesh)
    return batch_size * accumulate


@dataclass
class ArrayParts:
    """``parts(epoch, offset, num_steps)`` of in-memory data: `ArrayFeed` s of at most
    ``part_steps`` steps each (one step each around a profiled range, `cut`), each run
    by the program of `program_length` steps (``whole``: the call runs whole parts)."""

    data: Any
    data_key: jax.Array
    batch_size: int
    part_steps: int
    steps_per_epoch: int
    profile: Profile | None = None
    sampling: Any = None
    whole: bool = False

    def __call__(self, epoch: int, offset: int, num_steps: int) -> Iterator[Part]:
        start = epoch * self.steps_per_epoch + offset
        j = 0
        for n in cut(start, num_steps, self.part_steps, self.profile):
            at = np.int32(offset + j)
            feed = ArrayFeed(
                self.data, self.data_key, np.int32(epoch), at, self.batch_size, self.sampling
            )
            yield Part(feed, n, program_length(n, self.part_steps, self.whole))
            j += n


def cut(start: int, num_steps: int, k: int, profile: Profile | None) -> list[int]:
    """The parts of ``num_steps`` steps after ``start`` done: at most ``k`` each, and one
    step each around a profiled range (`Profile.pieces`)."""
    if profile is not None and profile.meets(start - 1, num_steps + 1):
        return profile.pieces(start, num_steps, k)
    return [min(k, num_steps - j) for j in range(0, num_steps, k)]


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
) -> Run:
    """The stream source (`jtricks.training.streaming`): host batches read ahead by a
    `Feeder` into chunks of K steps; the first batch is checked as arrays are."""
    if fit_options.sampler is not None:
        raise ConfigError(
            f"sampler={fit_options.sampler!r} draws from in-memory data; a stream's batches "
            "are its own (use class_weight with one weight per class instead)",
            param="sampler",
        )
    options = fit_options.step_options()
    steps_per_epoch = _stream_epoch(stream, fit_options.steps_per_epoch, length)
    start_step = int(member.step)
    total = _total_steps(length, steps_per_epoch, start_step)
    feeder = Feeder(stream, depth=fit_options.prefetch, state=data_state)
    try:
        first = jax.tree.map(np.asarray, feeder.first)
        data = check_data(member, options.task, first, "the training stream's first batch")
        check_options(options.task, data, options.augment, options.mix)
        n = num_examples(data)
        _check_stream_batch(n * jax.process_count(), fit_options.batch_size, options)
        if mesh is not None:
            check_batch(n // options.accumulate, mesh)
        k = min(fit_options.chunk or default_chunk(first, steps_per_epoch), steps_per_epoch)
        options = complete_options(options, member, mesh, data)
    except BaseException:
        feeder.close()
        raise
    plan = chunk_plan(start_step, steps_per_epoch, total, k)
    task = options.task
    check = partial(check_data, member, task)
    counted = fit_options.steps_per_epoch is None and stream_length(stream) == steps_per_epoch
    feeder.start(plan, k, chunk_sharding(mesh), check, steps_per_epoch if counted else None)
    split = k < steps_per_epoch or fit_options.profile is not None
    eval_step = compiled_steps(options)[1]
    program = programs.part_program(options)
    parts = partial(_chunks, feeder)
    source = options.eval_source
    run = Run(steps_per_epoch, total, data, program, parts, eval_step, source, split=split)
    run.close = feeder.close
    return run


def _stream_epoch(stream: Any, steps_per_epoch: int | None, length: Length) -> int:
    """A stream's epoch: ``steps_per_epoch``, else its ``len`` (less the shorter last batch
    a PyTorch-style loader announces, `short_last_batch`: it is not trained on), else
    (with ``steps``) the whole call."""
    if steps_per_epoch is None:
        steps_per_epoch = stream_length(stream)
        if steps_per_epoch is not None and steps_per_epoch > 1 and short_last_batch(stream):
            steps_per_epoch -= 1
    if steps_per_epoch is None and length.steps is None:
        if isinstance(stream, Iterator):
            fix = (
                "give steps=<total steps> to read it once (with steps_per_epoch=<batches> "
                "for epochs of an endless one), or the batches as a list or tuple (or anything "
                "iter() restarts) for any number of epochs"
            )
        else:
            fix = "give steps_per_epoch=<batches per pass> (or steps=<total steps>)"
        raise ConfigError(
            f"the training stream ({type(stream).__name__}) gives no epoch length "
            f"({'a one-shot iterator' if isinstance(stream, Iterator) else 'no len()'}): {fix}",
            param="steps_per_epoch",
        )
    return check_int("steps_per_epoch", steps_per_epoch or length.steps, low=1)


def _chunks(feeder: Feeder, epoch: int, offset: int, num_steps: int) -> Iterator[Part]:
    """The chunks of ``num_steps`` steps of an epoch, as the feeder planned them; ends
    early when a one-shot stream runs out."""
    remaining = num_steps
    while remaining > 0:
        item = feeder.next()
        if item is None:
            return
        chunk, n, state = item
        yield Part(ChunkFeed(chunk), n, feeder.chunk, state)
        remaining -= n


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
