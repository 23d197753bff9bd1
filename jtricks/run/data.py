"""A run's data phase: load the dataset, split, preprocess, and decide in-memory or streaming.

`train` (`jtricks.run`) asks for `RunData`: the task, the splits and a few training
inputs for building the model. In memory (the default), the splits are arrays and `fit`
gathers batches on device. Streaming (``stream=True``, or a ``shards:DIR`` dataset on
disk) hands `fit` a `jtricks.data.stream.BatchStream` of the same batches, read on the
host (by a Python thread or by Grain) and fed to the device ahead of use; a
``shards:DIR`` dataset is never loaded whole: validation and test are read in passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jtricks.data import Scaler, load_dataset, train_val_split
from jtricks.data.dataset import data_digest
from jtricks.data.datasets import for_task
from jtricks.data.shards import ShardSplits, is_shards_spec, load_shards
from jtricks.data.stream import BatchStream, EpochBatches, SequentialBatches, read_rows
from jtricks.data.targets import cast_targets
from jtricks.errors import ConfigError
from jtricks.run.config import TrainConfig
from jtricks.tasks import Classification, Regression, Task, build_task

SCALER_ROWS = 8192
"""Rows per block when preprocessing statistics are fitted over shards on disk."""


@dataclass
class RunData:
    """The data of one run.

    Attributes:
      task: the run's task spec (the dataset's own unless the config names one).
      num_classes: the model's output width.
      train, val, test: ``(x, y)`` arrays, or (on disk) `SequentialBatches` for val and
        test and ``None`` for train (read through `train_stream`).
      example: a few preprocessed training inputs (model init and shape checks).
      n_train: training examples (all processes).
      loss_floor: the dataset's lowest reachable test loss, where known.
      source, rows, transform: where `train_stream` reads (in-memory arrays or shards,
        their training rows, the preprocessing of a batch).
      scaler: the inputs' preprocessing, fitted on the training rows (``None`` for token
        ids, which are never rescaled).
      digest: `Dataset.digest` of the dataset as loaded (of a shard folder, `data_digest`
        of its targets and the layout of its shards: counts, lengths, shapes, dtypes, not
        every input byte), recorded in a run's ``config.json`` so that ``--resume``
        refuses data that changed since the run started.
      labels: the whole training split's targets where ``train`` holds this process's rows
        only (`jtricks.run.runner.share_processes`): class weights and logit offsets count
        them, the same in every process.
      target_scale: ``target_scale='standardize'``: the per-output ``(mean, std)`` of the
        training rows' regression targets (`jtricks.tasks.Regression.standardized`).
      classes: the class names (`Dataset.classes`), or ``None``.
    """

    task_spec: str
    num_classes: int
    train: Any
    val: Any
    test: Any
    example: np.ndarray
    n_train: int
    loss_floor: float | None = None
    source: Any = None
    rows: np.ndarray | None = None
    transform: Any = None
    scaler: Scaler | None = None
    digest: str = ""
    labels: np.ndarray | None = None
    target_scale: tuple | None = None
    classes: tuple[str, ...] | None = None

    def recorded(self) -> dict[str, Any]:
        """What a run folder's ``config.json`` records of its data: ``data_sha256`` (checked
        by ``--resume``), the fitted ``scaler`` and ``target_scale`` (`load_run` scales
        with them, not with ones fitted again on data that may have changed) and the
        ``shapes`` `load_run` rebuilds the model from without the data (`shapes`)."""
        scaler = None if self.scaler is None else self.scaler.to_json()
        record = {"data_sha256": self.digest or None, "scaler": scaler, "shapes": self.shapes()}
        return (
            record if self.target_scale is None else {**record, "target_scale": self.target_scale}
        )

    def shapes(self) -> dict[str, Any]:
        """What the run's model and task are built from, so that `from_shapes` rebuilds them
        without the dataset (moved, deleted, or arrays held in memory by another process):
        the task spec, output width, training examples, an input's shape and dtype, the
        training labels' class counts (class weights and logit offsets count them) and a
        regression's center (`jtricks.tasks.Regression.centered`)."""
        targets = None if self.on_disk else self.train[1] if self.labels is None else self.labels
        counts = center = None
        task = build_task(self.task_spec)
        if targets is not None and isinstance(task, Classification):
            counts = np.bincount(np.ravel(targets), minlength=self.num_classes).tolist()
        if targets is not None and isinstance(task, Regression):
            center = task.centered(np.asarray(targets)).center
        x = self.example
        return {
            "task": self.task_spec,
            "num_classes": self.num_classes,
            "n_train": self.n_train,
            "input": {"shape": list(x.shape[1:]), "dtype": str(x.dtype)},
            "label_counts": counts,
            "center": center,
            "on_disk": self.on_disk,
            "classes": None if self.classes is None else list(self.classes),
        }

    @classmethod
    def from_shapes(cls, shapes: dict[str, Any]) -> RunData:
        """A stand-in for the data `shapes` recorded: zeros of the input's shape, and
        training targets with the recorded class counts or regression center (the same
        class weights, logit offsets and center when the task is built from them)."""
        example = np.zeros((1, *shapes["input"]["shape"]), shapes["input"]["dtype"])
        counts, center = shapes["label_counts"], shapes["center"]
        train = None  # on disk
        if not shapes["on_disk"]:
            y = np.zeros(1)
            if counts is not None:
                y = np.repeat(np.arange(len(counts)), counts)
            elif center is not None:
                y = np.asarray([center], np.float64)
            train = (example, y)
        names = shapes.get("classes")
        return cls(
            shapes["task"],
            shapes["num_classes"],
            train,
            None,
            None,
            example,
            shapes["n_train"],
            classes=None if names is None else tuple(names),
        )

    @property
    def on_disk(self) -> bool:
        return self.train is None

    def streamed(self, config: Any) -> bool:
        """Whether training reads a stream: asked for (``stream``) or on disk."""
        return bool(config.stream) or self.on_disk

    def fit_input(
        self, config: Any, streaming: bool, key: jax.Array, at: int = 0, saved: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """What `fit` trains on and its stream keyword: the training arrays and ``{}``, or
        (``streaming``) the same batches as a stream (`train_stream`, data key ``key``)
        and ``{"data_state": ...}``, ``saved`` or the stream's position before step ``at``."""
        if not streaming:
            return self.train, {}
        stream = self.train_stream(config.batch_size * config.accumulate, key, config.loader)
        return stream, {"data_state": saved or stream.state_at(at)}

    def train_stream(self, batch_size: int, key: jax.Array, loader: str) -> BatchStream:
        """The training batches as a stream: exactly the in-memory path's batches
        (`EpochBatches` with the run's data key); with several processes, this process's
        block of every batch."""
        source = self.train if self.source is None else self.source
        batches = EpochBatches(
            source,
            batch_size,
            key,
            rows=self.rows,
            transform=self.transform,
            process=(jax.process_index(), jax.process_count()),
        )
        return BatchStream(batches, loader=loader)


def load_run_data(config: Any) -> RunData:
    """The dataset of ``config`` split and preprocessed (statistics from training rows only)."""
    if is_shards_spec(config.dataset):
        _target_scale(config, None, None)
        return _shards_data(config, load_shards(config.dataset))
    data = load_dataset(config.dataset)
    task = build_task(config.task or data.task)
    data = for_task(data, task.name)
    rows, val_rows = _split_rows(config, data, isinstance(task, Classification))
    x_tr = data.x_train[rows]
    own = data.val is not None  # a validation split the dataset brings
    x_val, y_val = data.val if own else (data.x_train[val_rows], data.y_train[val_rows])
    x_test, scaler = data.x_test, None
    if not np.issubdtype(x_tr.dtype, np.integer):  # token ids are never rescaled
        scaler = Scaler.fit(config.preprocess, x_tr)
        x_tr, x_val, x_test = scaler(x_tr), scaler(x_val), scaler(x_test)
    train, val, test = (x_tr, data.y_train[rows]), (x_val, y_val), (x_test, data.y_test)
    if data.mask_train is not None:  # (x, y, mask) batches: the tasks read index 2
        train, val = (*train, data.mask_train[rows]), (*val, data.mask_train[val_rows])
        test = (*test, data.mask_test)
    return RunData(
        config.task or data.task,
        data.num_classes,
        train,
        val,
        test,
        x_tr[:64],
        len(rows),
        data.loss_floor,
        scaler=scaler,
        target_scale=_target_scale(config, task, data.y_train[rows]),
        classes=data.classes,
        digest=data.digest(),
    )


def _target_scale(config: Any, task: Task | None, targets: Any) -> tuple | None:
    """The ``(mean, std)`` of ``target_scale='standardize'`` (``None`` for ``'none'``);
    a `ConfigError` for a task other than regression, or targets on disk (``task``
    ``None``: a shard folder, never loaded whole)."""
    if config.target_scale == "none":
        return None
    if task is None:
        raise ConfigError(
            f"target_scale={config.target_scale!r} needs the training targets in memory; "
            f"the dataset {config.dataset!r} is streamed from disk",
            param="target_scale",
        )
    if not isinstance(task, Regression):
        raise ConfigError(
            f"target_scale={config.target_scale!r} standardizes regression targets; this "
            f"run's task is {task.name}",
            param="target_scale",
        )
    return task.standardized(targets).scale


def _split_rows(config: Any, data: Any, classes: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Training and validation rows of the training split: a seeded ``val_fraction``
    (stratified by class for classification unless ``stratify`` is off), or every row
    for training when the dataset brings its own validation split (``val_rows`` None)."""
    every = np.arange(len(data.y_train))
    if data.val is not None:
        refuse_split_settings(config, f"dataset {config.dataset!r}")
        return every, None
    rows, _, val_rows, _ = train_val_split(
        every,
        data.y_train,
        config.val_fraction,
        seed=config.seed,
        stratify=config.stratify and classes,
    )
    return rows, val_rows


def _shards_data(config: Any, splits: ShardSplits) -> RunData:
    """Shards on disk: validation from ``val/`` or a seeded ``val_fraction`` of the
    training rows; the scaler fitted over the training rows in blocks."""
    task: Task = build_task(config.task or splits.task)
    splits = splits.for_task(task.name)
    labels = np.concatenate([np.asarray(a) for a in splits.train.arrays["y"]])
    rows = np.arange(len(labels))
    val_source, val_rows = splits.val, None
    if splits.val is not None:
        refuse_split_settings(config, f"shard folder {config.dataset!r} (its val/)")
    else:
        stratify = config.stratify and isinstance(task, Classification)
        rows, _, val_rows, _ = train_val_split(
            rows, labels, config.val_fraction, seed=config.seed, stratify=stratify
        )
        val_source = splits.train

    def blocks():
        for s in range(0, len(rows), SCALER_ROWS):
            yield splits.train.gather(rows[s : s + SCALER_ROWS])["x"]

    # every split, before anything is written
    check_finite_rows(splits.train, rows, "training")
    check_finite_rows(
        val_source, np.arange(len(val_source)) if val_rows is None else val_rows, "validation"
    )
    check_finite_rows(splits.test, np.arange(len(splits.test)), "test")

    tokens = np.issubdtype(splits.stand_in().dtype, np.integer) and splits.task == "lm"
    scaler = None if tokens else Scaler.fit_chunks(config.preprocess, blocks)  # ids: as they are
    transform = _Preprocess(scaler, cast_targets(splits.task, np.zeros(0)).dtype)
    size = config.eval_batch_size
    return RunData(
        config.task or splits.task,
        splits.num_classes,
        None,
        SequentialBatches(val_source, size, rows=val_rows, transform=transform),
        SequentialBatches(splits.test, size, transform=transform),
        read_rows(splits.train, rows[:64], transform)[0],
        len(rows),
        source=splits.train,
        rows=rows,
        transform=transform,
        scaler=scaler,
        digest=data_digest(labels, _layout(splits)),
    )


def _layout(splits: ShardSplits) -> np.ndarray:
    """The shards' layout as bytes: each split's fields, dtypes and shard shapes."""
    sources = [x for x in (splits.train, splits.val, splits.test) if x is not None]
    text = repr(
        [
            (field, shards[0].dtype.str, [a.shape for a in shards])
            for source in sources
            for field, shards in sorted(source.arrays.items())
        ]
    )
    return np.frombuffer(text.encode(), np.uint8)


def refuse_split_settings(config: Any, what: str) -> None:
    """Refuse ``val_fraction`` (other than its default) and ``stratify=False`` for data
    that bring their own validation split (``what``), which they would not change.

    Raises:
      ConfigError (``param`` the setting).
    """
    default = TrainConfig.__dataclass_fields__["val_fraction"].default
    for name, unused in (
        ("val_fraction", config.val_fraction != default),
        ("stratify", not config.stratify),
    ):
        if unused:
            raise ConfigError(
                f"{name}={getattr(config, name)!r} would not be used: {what} brings its own "
                "validation split; drop the setting",
                param=name,
            )


def check_finite_rows(source: Any, rows: np.ndarray, split: str) -> None:
    """Refuse rows of shards (the ``split``'s) holding NaN or inf, naming the first one's
    shard and row (one pass over the rows, block by block).

    Raises:
      ConfigError (``param="dataset"``).
    """
    for s in range(0, len(rows), SCALER_ROWS):
        block = rows[s : s + SCALER_ROWS]
        x = source.gather(block)["x"]
        if np.issubdtype(x.dtype, np.floating):
            bad = ~np.isfinite(x.reshape(len(block), -1)).all(axis=1)
            if bad.any():
                raise ConfigError(
                    f"dataset: the {split} data hold NaN or inf, first in "
                    f"{source.where(int(block[np.argmax(bad)]))}",
                    param="dataset",
                )


@dataclass(frozen=True)
class _Preprocess:
    """A shard batch ``{"x", "y"[, "mask"]}`` as the in-memory ``(x, y[, mask])``: inputs scaled to float32
    (token ids, with no scaler, as int32), targets in the task's dtype (int32 labels and
    tokens, float32 otherwise; `jtricks.data.targets.cast_targets`)."""

    scaler: Scaler | None
    target_dtype: Any = np.int32

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        x = np.asarray(batch["x"], np.int32) if self.scaler is None else self.scaler(batch["x"])
        y = np.asarray(batch["y"], self.target_dtype)
        return (x, y) if "mask" not in batch else (x, y, np.asarray(batch["mask"], np.float32))


def refuse_on_disk(config: Any, data: RunData) -> None:
    """Options that need the training split in memory, refused for a dataset on disk."""
    if not data.on_disk:
        return
    needs_memory = {
        "swa": config.swa is not None,
        "tta": config.tta > 1,
    }
    for name, used in needs_memory.items():
        if used:
            raise ConfigError(
                f"{name} needs the training data in memory; the dataset {config.dataset!r} "
                "is streamed from disk",
                param=name,
            )
