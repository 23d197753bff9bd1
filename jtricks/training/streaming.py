"""Training on streams: host batches fed ahead of use into compiled chunks of K steps.

`fit` takes a stream (`jtricks.data.stream.is_stream`) in place of arrays. Then:

* a background thread (`Feeder`) draws host batches from ``iter(stream)``, stacks K
  of them into a chunk ``(K, B, ...)`` and starts its transfer with `jax.device_put`
  (asynchronous; with a mesh straight onto the data-parallel sharding, and across
  processes each process's own rows through `jax.make_array_from_process_local_data`),
  ``depth`` chunks ahead, so the device never waits for the host while the host is
  fast enough;
* the run's one part program (`jtricks.training.epoch.make_part_program`) runs a chunk's
  K steps (a `ChunkFeed`: the same step and static-length `lax.scan` as the in-memory
  epoch, a short chunk masked, so a stream of the same batches gives bit-identical
  parameters), and its epoch-end call ends the epoch;
* after each chunk the feeder records the iterator's state (`data_state`) after the
  chunk's last batch, so an epoch's record says where the next batch comes from,
  whatever the thread has read ahead.

New here: Grain and ``jax.device_put`` give reading and transfer; the chunked,
checkpoint-aware feeding of a jitted training loop is jtricks' own.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtricks.caches import cached
from jtricks.data.stream import data_state, restore_iterator
from jtricks.errors import ConfigError, StreamError
from jtricks.training.distributed import batch_axes
from jtricks.training.steps import evaluation_step

CHUNK_BYTES = 64 * 2**20
"""The default chunk holds at most this many bytes of batches (and at most `MAX_CHUNK`)."""
MAX_CHUNK = 64


def default_chunk(batch: Any, steps_per_epoch: int) -> int:
    """K, the steps per compiled chunk: as many batches as fit in `CHUNK_BYTES` (at least
    1, at most `MAX_CHUNK` and one epoch): enough steps per dispatch that a small model's
    dispatch cost vanishes, few enough that two chunks in flight stay small."""
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(batch))
    return int(max(1, min(MAX_CHUNK, steps_per_epoch, CHUNK_BYTES // max(nbytes, 1))))


def chunk_plan(
    start_step: int, steps_per_epoch: int, total_steps: int, chunk: int
) -> Iterator[int]:
    """Chunk sizes of a run of ``total_steps`` steps from ``start_step``: each epoch's steps
    cut into chunks of ``chunk`` (its last one shorter), so no chunk spans two epochs."""
    done = 0
    while done < total_steps:
        offset = (start_step + done) % steps_per_epoch
        n = min(steps_per_epoch - offset, total_steps - done)
        for s in range(0, n, chunk):
            yield min(chunk, n - s)
        done += n


_END = object()


class Feeder:
    """Draws batches from ``iter(stream)`` on a background thread and hands out device
    chunks (see the module docstring); ``next()`` returns ``(chunk, n, state)``, or
    ``None`` once a one-shot stream is exhausted. A re-iterable stream that runs out
    starts a new pass (``iter(stream)`` again), also when the pass a ``state`` restores
    was already at its end (a resume at an epoch boundary). The first batch is read at once
    (``self.first``), so a stream that fails at once fails in the caller.

    Raises (from ``next``):
      StreamError: the stream raised, or yielded a batch unlike the first.
    """

    def __init__(self, stream: Any, *, depth: int = 2, state: Any = None) -> None:
        self.stream, self.depth = stream, depth
        self.iterator = iter(stream)
        if state is not None:
            restore_iterator(self.iterator, state)
        self.read = 0
        self.resumed = state is not None  # a pass begun before: it may be at its end
        try:
            self.first = self._next_batch()
        except Exception as e:
            raise StreamError(f"the training stream failed at its first batch: {_why(e)}") from e
        if self.first is None:
            raise StreamError("the training stream yielded no batch")
        self._pending = [self.first]
        self._treedef = jax.tree.structure(self.first)
        self._shapes = [np.shape(a) for a in jax.tree.leaves(self.first)]
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(
        self, plan: Iterator[int], chunk: int, sharding: Any = None, check=None, epoch_steps=None
    ) -> None:
        """Start reading: chunks of the sizes in ``plan`` (each padded to ``chunk``), each
        chunk's real batches given to ``check(batch, where)`` as one batch first (the data
        checks of arrays, on the chunks as they are read: a full pass first would cost a
        second read of the data). ``epoch_steps``: the batches per epoch when they were
        counted by ``len(stream)`` (for the warning of `_note_short`)."""
        self.chunk, self.sharding, self.check, self.checked = chunk, sharding, check, 0
        self.epoch_steps, self.note, self.warned = epoch_steps, None, False
        self._thread = threading.Thread(target=self._run, args=(plan,), daemon=True)
        self._thread.start()

    def _next_batch(self) -> Any:
        try:
            batch = next(self.iterator)
        except StopIteration:
            fresh = iter(self.stream)
            if fresh is self.iterator or (self.read == 0 and not self.resumed):
                return None  # one-shot, or a pass that yields nothing
            self.iterator, self.read = fresh, 0  # a new pass over a re-iterable stream
            self.resumed = False
            try:
                batch = next(self.iterator)
            except StopIteration:
                return None
        self.read += 1
        return batch

    def _run(self, plan: Iterator[int]) -> None:
        try:
            for size in plan:
                host, n = self._read(size)
                if n and self.check is not None:
                    self._check_rows(host, n)
                if n and not self._offer((self._put(host), n, data_state(self.iterator))):
                    return
                if n < size:
                    break
            self._offer(_END)
        except BaseException as e:  # handed to the training thread, which raises it
            self._offer(e)

    def _check_rows(self, host: Any, n: int) -> None:
        """A chunk's ``n`` real batches through ``check``, as one batch."""
        rows = jax.tree.map(lambda a: a[:n].reshape(-1, *a.shape[2:]), host)
        first, self.checked = self.checked + 1, self.checked + n
        where = f"the training stream's batches {first}-{self.checked} (checked as read)"
        self.check(rows, where)

    def _read(self, size: int) -> tuple[Any, int]:
        """Up to ``size`` batches stacked and padded to the chunk, and how many are real.
        An iterator with ``next_chunk(count)`` (`jtricks.data.stream.BatchStream`'s) hands
        them stacked in one read."""
        batches, self._pending = self._pending, []
        fast = getattr(self.iterator, "next_chunk", None)
        if fast is not None and len(batches) < size:
            rest = fast(size - len(batches))
            if batches:
                rest = jax.tree.map(lambda a, *b: np.concatenate([np.stack(b), a]), rest, *batches)
            return self._pad(rest, size), size
        while len(batches) < size:
            batch = self._next_batch()
            if batch is None:
                break
            batch = self._checked(batch)
            if batch is not None:  # None: a pass's shorter last batch, left out
                batches.append(batch)
        if not batches:
            return None, 0
        host = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)
        return self._pad(host, len(batches)), len(batches)

    def _pad(self, host: Any, n: int) -> Any:
        """Repeat the last batch up to the chunk size: one program serves every chunk."""
        if n == self.chunk:
            return host
        return jax.tree.map(
            lambda a: np.concatenate([a, np.repeat(a[-1:], self.chunk - n, axis=0)]), host
        )

    def _last_short(self, batch: Any, shapes: list[tuple[int, ...]]) -> bool:
        """Whether ``batch`` (its leaves' ``shapes``) is a pass's shorter last batch (the
        first batch's structure and per-example shapes, fewer examples, nothing after it
        in the pass): left out of training, as in-memory arrays leave out the rows that
        fill no batch and as a list of batches leaves out its shorter last one. A shorter
        batch with more after it is refused. Peeking ends nothing: a finished iterator
        stays finished."""
        alike = jax.tree.structure(batch) == self._treedef and len(shapes) == len(self._shapes)
        if not alike or not all(
            s[1:] == f[1:] and 0 < s[0] < f[0] for s, f in zip(shapes, self._shapes, strict=True)
        ):
            return False
        full, n = self.read - 1, shapes[0][0]
        try:
            next(self.iterator)
        except StopIteration:
            self._note_short(full, n)
            return True
        raise StreamError(
            f"the training stream's batch {self.read} of its pass holds {n} examples, the "
            f"first {self._shapes[0][0]}; only a pass's last batch may be shorter (it is left "
            "out of training)"
        )

    def _note_short(self, full: int, n: int) -> None:
        """Note (once; `next` warns in the caller's thread) when an epoch counted from
        ``len(stream)`` included the shorter last batch: epochs no longer line up with
        passes."""
        if self.note is None and self.epoch_steps == full + 1:
            self.note = (
                f"the training stream's last batch of a pass holds {n} examples, fewer than "
                f"the others: it is left out of training, so an epoch of {full + 1} batches "
                f"(its len()) runs into the next pass; give steps_per_epoch={full} for epochs "
                "of one pass"
            )

    def _checked(self, batch: Any) -> Any:
        """``batch`` when it is like the first; ``None`` for a pass's shorter last batch
        (`_last_short`); any other batch is refused."""
        shapes = [np.shape(a) for a in jax.tree.leaves(batch)]
        if jax.tree.structure(batch) == self._treedef and shapes == self._shapes:
            return batch
        if self._last_short(batch, shapes):
            return None
        raise StreamError(
            f"the training stream's batch {self.read} has structure "
            f"{jax.tree.structure(batch)} and shapes {shapes}; its first batch had "
            f"{self._treedef} and {self._shapes} (every batch must be alike; a pass may "
            "end with a shorter one, left out of training)"
        )

    def _put(self, host: Any) -> Any:
        """Start the chunk's transfer (asynchronous), onto the sharding when there is one;
        across processes each process gives its own rows of every batch."""
        if self.sharding is not None and jax.process_count() > 1:
            return jax.tree.map(
                lambda a: jax.make_array_from_process_local_data(self.sharding, a), host
            )
        return jax.device_put(host, self.sharding)

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[Any, int, Any] | None:
        item = self._queue.get()
        if self.note is not None and not self.warned:
            self.warned = True
            warnings.warn(self.note, stacklevel=2)
        if item is _END:
            self._queue.put(_END)  # every later call sees the end too
            return None
        if isinstance(item, StreamError | ConfigError):  # a batch refused: in its own words
            raise item
        if isinstance(item, BaseException):
            raise StreamError(
                f"the training stream failed after {self.read} batch(es) of this pass: {_why(item)}"
            ) from item
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and drop what it read ahead."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def chunk_sharding(mesh: Any) -> NamedSharding | None:
    """Chunks ``(K, B, ...)`` sharded over their batch axis (the data and fsdp axes)."""
    return None if mesh is None else NamedSharding(mesh, P(None, batch_axes(mesh)))


@cached
def _sums_fn(eval_step, source: str):
    def sums(state, batch, weight):
        step, state = evaluation_step(eval_step, state, source)
        return step(state, batch, weight)

    return jax.jit(sums)


def evaluate_stream(eval_step, state, stream: Any, source: str = "auto") -> dict[str, Any]:
    """The task's metrics of ``state`` over one pass of ``stream`` (``iter(stream)``):
    per-batch sums added on device, exact over the whole pass. A shorter last batch is
    padded to the first batch's size with zero weights, so one program serves the pass."""
    fn = _sums_fn(eval_step, source)
    total, size = None, None
    for i, batch in enumerate(_batches(stream)):
        batch = jax.tree.map(np.asarray, batch)
        n = len(jax.tree.leaves(batch)[0])
        size = n if size is None else size
        if n > size:
            raise StreamError(
                f"the evaluation stream's batch {i} has {n} examples, more than its first "
                f"batch's {size}"
            )
        pad = size - n
        batch = jax.tree.map(partial(_pad_rows, pad=pad), batch)
        weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
        sums = fn(state, batch, weight)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise StreamError("the evaluation stream yielded no batch")
    step, _ = evaluation_step(eval_step, state, source)
    return jax.device_get(step.metrics(total))


def _pad_rows(a: np.ndarray, pad: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])


def _batches(stream: Any) -> Iterator:
    try:
        yield from stream
    except StreamError:
        raise
    except Exception as e:
        raise StreamError(f"the evaluation stream failed: {_why(e)}") from e


__all__ = [
    "Feeder",
    "chunk_plan",
    "chunk_sharding",
    "default_chunk",
    "evaluate_stream",
]
