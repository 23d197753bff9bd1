"""Streams: training data as an iterable of host batches, for data larger than device memory.

`jtricks.training.fit` takes, besides arrays, any iterable of host batches (pytrees of
NumPy arrays whose leading axis is the batch), e.g. a Grain ``IterDataset`` or
``DataLoader``, or a generator. This module holds the host side:

* `EpochBatches`: batch ``i`` of the run, ``epoch, j = divmod(i, steps_per_epoch)``,
  holds the examples ``epoch_indices(fold_in(key, epoch), N, B, N // B)[j]``: exactly the
  batches the in-memory path gathers on device, read from any source on the host.
* `BatchStream`: an endless, checkpointable stream of those batches, read by a Python
  thread (``loader="python"``) or by Grain's threaded reader (``loader="grain"``).
* `SequentialBatches`: one pass in order, the last batch shorter (evaluation).

Sources are in-memory arrays or `jtricks.data.shards.ShardedArrays` (``.npy`` shards
read memory-mapped).

Iterator state (new here: the protocol `fit` checkpoints). An iterator that has
``get_state()`` and ``set_state(state)`` (Grain's iterators, `BatchStream`'s) is
resumable: `data_state` reads it as JSON, `restore_iterator` puts it back, and `fit`
records it after the last batch of every epoch, so a resumed run continues with the very
next batch. A plain iterator has no state: such a run can be continued only from its
start.

References: Grain, https://github.com/google/grain (random-access sources,
``MapDataset``, checkpointable iterators).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from jax import tree_util

from jtricks.caches import cached
from jtricks.data.shards import ShardedArrays
from jtricks.errors import ConfigError, check_int

LOADERS = ("python", "grain")
UNKNOWN_LENGTH = 2**40
"""A ``len()`` at or above this is an endless stream (Grain's ``repeat()`` reports
``sys.maxsize``): it gives no epoch length."""


def is_stream(data: Any) -> bool:
    """Whether ``data`` is a stream (an iterable of batches) rather than arrays: a list or
    tuple of batches (`is_batch_sequence`), or anything iterable that is not a tuple,
    list, dict or array (those are array pytrees) and not text (a string is not batches:
    it is refused as data where arrays are checked)."""
    if is_batch_sequence(data):
        return True
    arrays = (tuple, list, Mapping, np.ndarray, str, bytes)
    return hasattr(data, "__iter__") and not isinstance(data, arrays) and not hasattr(data, "shape")


def is_batch_sequence(data: Any) -> bool:
    """Whether a list or tuple holds batches, ``[(x0, y0), (x1, y1), ...]`` (what a PyTorch
    user has), rather than being one pytree of arrays such as ``(x, y)``: every entry is a
    tuple, list or dict of arrays, all of one structure, whose leaves agree in dtype and
    in every axis but the first (the batch axis, which may differ)."""
    if not isinstance(data, list | tuple) or not data:
        return False
    if not all(isinstance(entry, tuple | list | Mapping) and entry for entry in data):
        return False
    first = _signature(data[0])
    return first is not None and all(_signature(entry) == first for entry in data[1:])


def _signature(batch: Any) -> tuple | None:
    """A batch's structure, leaf dtypes and per-example shapes (``None``: not a batch)."""
    leaves, treedef = tree_util.tree_flatten(batch)
    if not leaves or not all(np.ndim(a) >= 1 and hasattr(a, "dtype") for a in leaves):
        return None
    return treedef, tuple((np.dtype(a.dtype), np.shape(a)[1:]) for a in leaves)


def training_batches(batches: list | tuple) -> tuple:
    """A sequence of batches as training reads it: every batch as large as the first; a
    shorter last batch is left out (as in-memory arrays leave out the ``N mod B``
    examples that fill no batch; evaluation reads it).

    Raises:
      ConfigError: a batch other than the last whose size differs from the first's.
    """
    sizes = [int(np.shape(tree_util.tree_leaves(b)[0])[0]) for b in batches]
    for i, n in enumerate(sizes):
        if any(int(np.shape(a)[0]) != n for a in tree_util.tree_leaves(batches[i])):
            raise ConfigError(
                f"training data: batch {i} holds arrays of different lengths", param="train_data"
            )
        last = i == len(sizes) - 1 and i > 0
        if n != sizes[0] and not (last and n < sizes[0]):
            raise ConfigError(
                f"training data: batch {i} of the list holds {n} examples, the first "
                f"{sizes[0]}; only the last batch may be shorter (it is left out of training)",
                param="train_data",
            )
    return tuple(b for b, n in zip(batches, sizes, strict=True) if n == sizes[0])


def short_last_batch(loader: Any) -> bool:
    """Whether a PyTorch-style loader says its passes end with a shorter batch: its
    ``drop_last`` is ``False`` and ``len(loader.dataset)`` is not a multiple of its
    ``batch_size`` (`torch.utils.data.DataLoader`'s attributes; ``False`` for anything
    that does not have them)."""
    size, dataset = getattr(loader, "batch_size", None), getattr(loader, "dataset", None)
    if getattr(loader, "drop_last", None) is not False or not isinstance(size, int) or size < 1:
        return False
    try:
        return len(dataset) % size != 0
    except TypeError:
        return False


def stream_length(stream: Any) -> int | None:
    """Batches in one pass of ``stream`` (its ``len``), or ``None`` for an endless or
    unsized one."""
    try:
        n = len(stream)
    except TypeError:
        return None
    return n if 0 < n < UNKNOWN_LENGTH else None


def data_state(iterator: Iterator) -> Any:
    """The JSON-able state of ``iterator`` (``get_state()``), or ``None`` when it has none.
    Bytes states (Grain's ``DataLoader``) are kept as ``{"bytes": text}``."""
    get = getattr(iterator, "get_state", None)
    if get is None:
        return None
    state = get()
    return {"bytes": state.decode()} if isinstance(state, bytes) else state


def restore_iterator(iterator: Iterator, state: Any) -> None:
    """Put a `data_state` back into ``iterator``.

    Raises:
      ConfigError: the iterator has no ``set_state`` (a plain Python iterator cannot
        continue where it stopped).
    """
    put = getattr(iterator, "set_state", None)
    if put is None:
        raise ConfigError(
            f"data_state: the training stream's iterator ({type(iterator).__name__}) has no "
            "set_state, so it cannot continue where a run stopped; use a Grain dataset or "
            "jtricks.data.stream.BatchStream, or give the iterator get_state/set_state",
            param="data_state",
        )
    if isinstance(state, dict) and set(state) == {"bytes"}:
        state = state["bytes"].encode()
    put(state)


class EpochBatches:
    """Random access to the batches of a run: ``batches[i]`` is batch ``j`` of epoch
    ``e`` (``e, j = divmod(i, steps_per_epoch)``), the examples
    ``rows[epoch_indices(fold_in(key, e), N, batch_size, N // batch_size)[j]]`` of
    ``source``.

    These are the batches `fit`'s in-memory path gathers on device from the same
    ``data_key``, so both paths train on the same examples in the same order.

    Args:
      source: a `ShardedArrays`, or in-memory data (a tuple, list or dict of arrays).
      batch_size: examples per batch (per optimizer update).
      key: the data key (`fit`'s ``data_key``).
      rows: the source rows to draw from (default: all), e.g. the training part of a split.
      transform: optional host function applied to the gathered rows (e.g. scaling); it
        may receive several batches' rows at once (`stacked`), so it must treat rows
        independently.
      process: ``(index, count)`` of a multi-process run (`jax.distributed`): this
        process reads only its block of every batch, rows ``index * b`` to
        ``(index + 1) * b - 1`` with ``b = batch_size // count``, so that the processes'
        blocks in process order (`jax.make_array_from_process_local_data`) are the batch
        one process would read: the run sees the same batches on any number of
        processes, and each process reads 1/count of the data.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        key: Any,
        *,
        rows: np.ndarray | None = None,
        transform: Callable[[Any], Any] | None = None,
        process: tuple[int, int] = (0, 1),
    ) -> None:
        self.source, self.key, self.transform = source, key, transform
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.num_examples = _rows(source) if self.rows is None else len(self.rows)
        self.batch_size = check_int("batch_size", batch_size, low=1, high=self.num_examples)
        self.steps_per_epoch = self.num_examples // self.batch_size
        index, count = process
        if count < 1 or not 0 <= index < count or self.batch_size % count:
            raise ConfigError(
                f"process={process!r}: a batch of {self.batch_size} is read by {count} "
                "process(es) in equal blocks, so the count must divide it and the index be "
                f"in 0 .. {count - 1}",
                param="batch_size",
            )
        block = self.batch_size // count
        self._block = slice(index * block, (index + 1) * block)
        self._lock = threading.Lock()
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def indices(self, epoch: int) -> np.ndarray:
        """The epoch's ``(steps_per_epoch, batch_size)`` example indices (this process's
        block of each batch), computed once per epoch with JAX on the CPU (the same random
        bits as on any device)."""
        with self._lock:
            if self._cached is None or self._cached[0] != epoch:
                import jax

                sizes = (self.num_examples, self.batch_size, self.steps_per_epoch)
                with jax.default_device(jax.local_devices(backend="cpu")[0]):
                    idx = _epoch_indices()(self.key, np.int32(epoch), *sizes)
                self._cached = (epoch, np.asarray(idx)[:, self._block])
            return self._cached[1]

    def __getitem__(self, i: int) -> Any:
        epoch, j = divmod(int(i), self.steps_per_epoch)
        idx = self.indices(epoch)[j]
        return read_rows(self.source, idx if self.rows is None else self.rows[idx], self.transform)

    def stacked(self, start: int, count: int) -> Any:
        """Batches ``start .. start + count - 1`` stacked, leaves ``(count, B, ...)``: the
        same as stacking ``self[i]``, read in one gather (and one ``transform`` call)."""
        parts = []
        for i in range(start, start + count):
            epoch, j = divmod(i, self.steps_per_epoch)
            parts.append(self.indices(epoch)[j])
        idx = np.concatenate(parts)
        rows = read_rows(self.source, idx if self.rows is None else self.rows[idx], self.transform)
        return _unflatten(rows, count)


def _unflatten(batch: Any, count: int) -> Any:
    if isinstance(batch, tuple | list):
        return type(batch)(a.reshape(count, -1, *a.shape[1:]) for a in batch)
    if isinstance(batch, Mapping):
        return {k: a.reshape(count, -1, *a.shape[1:]) for k, a in batch.items()}
    import jax

    return jax.tree.map(lambda a: a.reshape(count, -1, *a.shape[1:]), batch)


@cached
def _epoch_indices():
    """`epoch_indices` of ``fold_in(key, epoch)``, compiled once (one dispatch an epoch)."""
    import jax

    from jtricks.data.batching import epoch_indices

    def indices(key, epoch, n, batch_size, steps):
        return epoch_indices(jax.random.fold_in(key, epoch), n, batch_size, steps)

    return jax.jit(indices, static_argnums=(2, 3, 4))


def read_rows(source: Any, idx: np.ndarray, transform: Callable | None = None) -> Any:
    """Rows ``idx`` of a `ShardedArrays` or of in-memory data, then ``transform``."""
    if isinstance(source, ShardedArrays):
        batch = source.gather(idx)
    elif isinstance(source, tuple | list):  # the common layouts, without a tree traversal
        batch = type(source)(np.asarray(a)[idx] for a in source)
    elif isinstance(source, Mapping):
        batch = {k: np.asarray(a)[idx] for k, a in source.items()}
    else:
        import jax

        batch = jax.tree.map(lambda a: np.asarray(a)[idx], source)
    return batch if transform is None else transform(batch)


class SequentialBatches:
    """One pass over ``source`` (or its ``rows``) in order, ``batch_size`` examples a
    batch, the last one shorter: an evaluation stream (`jtricks.training.evaluate`)
    that reads a split larger than memory. Re-iterable; ``len`` is the batch count."""

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        rows: np.ndarray | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.source, self.transform = source, transform
        self.rows = np.arange(_rows(source)) if rows is None else np.asarray(rows, np.int64)
        self.batch_size = check_int("batch_size", batch_size, low=1)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator:
        for s in range(0, len(self.rows), self.batch_size):
            yield read_rows(self.source, self.rows[s : s + self.batch_size], self.transform)


def _rows(data: Any) -> int:
    if isinstance(data, ShardedArrays):
        return len(data)
    import jax

    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ConfigError("the data has no arrays", param="train_data")
    return len(leaves[0])


class BatchStream:
    """An endless stream of `EpochBatches`, with a checkpointable iterator.

    ``len(stream)`` is the epoch length (`fit` takes it as ``steps_per_epoch``);
    ``iter(stream)`` starts at batch ``start`` and has ``get_state`` / ``set_state``.

    Args:
      batches: the `EpochBatches` to read.
      loader: ``"python"``: batches read in order by the caller's thread (`fit` reads
        them on a background thread); ``"grain"``: Grain's ``MapDataset`` reads them with
        ``threads`` threads and ``buffer`` batches ahead (``pip install jtricks[grain]``).
      threads, buffer: Grain's read options.
    """

    def __init__(
        self, batches: EpochBatches, *, loader: str = "python", threads: int = 2, buffer: int = 8
    ) -> None:
        if loader not in LOADERS:
            raise ConfigError(
                f"loader must be one of {', '.join(LOADERS)}; got {loader!r}", param="loader"
            )
        if not isinstance(batches, EpochBatches):
            hint = (
                ": it is a stream already (one pass in order, for evaluation): give it as it is"
                if isinstance(batches, SequentialBatches)
                else ""
            )
            raise ConfigError(
                f"BatchStream reads EpochBatches (shuffled training batches); got "
                f"{type(batches).__name__}{hint}",
                param="batches",
            )
        if loader == "grain":
            _import_grain()
        self.batches, self.loader = batches, loader
        self.threads = check_int("threads", threads, low=1)
        self.buffer = check_int("buffer", buffer, low=1)

    def __len__(self) -> int:
        return len(self.batches)

    def state_at(self, step: int) -> dict[str, int]:
        """The iterator state that starts at batch ``step`` (for either loader: both
        iterators keep ``{"next_index": i}``)."""
        return {"next_index": check_int("step", int(step), low=0)}

    def __iter__(self) -> Iterator:
        if self.loader == "python":
            return _IndexIterator(self.batches)
        grain = _import_grain()
        ds = grain.MapDataset.range(0, UNKNOWN_LENGTH).map(self.batches.__getitem__)
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.buffer)
        return iter(ds.to_iter_dataset(options))


class _IndexIterator:
    """Batches ``batches[i]`` for ``i = next, next + 1, ...``; state ``{"next_index": i}``
    (the same state Grain's iterator over the same batches has)."""

    def __init__(self, batches: EpochBatches) -> None:
        self.batches, self.next_index = batches, 0

    def __iter__(self) -> _IndexIterator:
        return self

    def __next__(self) -> Any:
        batch = self.batches[self.next_index]
        self.next_index += 1
        return batch

    def next_chunk(self, count: int) -> Any:
        """The next ``count`` batches stacked (`EpochBatches.stacked`): the feeder's fast path."""
        chunk = self.batches.stacked(self.next_index, count)
        self.next_index += count
        return chunk

    def get_state(self) -> dict[str, int]:
        return {"next_index": self.next_index}

    def set_state(self, state: dict[str, int]) -> None:
        self.next_index = int(state["next_index"])


def _import_grain():
    try:
        import grain
    except ImportError:
        raise ConfigError(
            "loader='grain' needs Grain: pip install 'jtricks[grain]' (or pip install grain)",
            param="loader",
        ) from None
    return grain
