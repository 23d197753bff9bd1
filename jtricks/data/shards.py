"""Examples on disk as a folder of ``.npy`` shards, read memory-mapped.

A `ShardedArrays` folder never loads the whole set: each shard is opened with
``np.load(mmap_mode="r")`` and a batch reads only its rows. It is a random-access
source (``len`` and ``[i]``, the protocol of Grain's ``MapDataset.source``) and has a
fast ``gather`` for whole batches, which `jtricks.data.stream.EpochBatches` uses.
`write_shards` writes one atomically, from arrays or shard by shard (for sets larger
than memory).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jtricks.data.targets import TASK_NAMES, infer_task, outputs_for
from jtricks.errors import ConfigError, WriteError, check_int

_SHARD = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)-(?P<index>\d{5})\.npy$")


class ShardedArrays:
    """Examples stored as a folder of ``.npy`` shards, read memory-mapped.

    Layout: ``FIELD-NNNNN.npy`` for every field (e.g. ``x`` and ``y``) and shard
    ``NNNNN = 00000, 00001, ...``; every field's shard ``k`` holds the same examples.
    ``len(src)`` is the number of examples, ``src[i]`` example ``i`` as a dict of
    fields (Grain's random-access protocol), ``src.gather(idx)`` a batch.

    Raises:
      ConfigError: a missing folder, no shards, a field missing a shard, or shards of
        different lengths.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"shard folder {str(self.path)!r} does not exist", param="dataset")
        found: dict[str, dict[int, Path]] = {}
        for p in self.path.iterdir():
            m = _SHARD.match(p.name)
            if m:
                found.setdefault(m["field"], {})[int(m["index"])] = p
        if not found:
            raise ConfigError(
                f"shard folder {str(self.path)!r} holds no FIELD-NNNNN.npy files "
                "(e.g. x-00000.npy, y-00000.npy)",
                param="dataset",
            )
        count = max(len(v) for v in found.values())
        self.fields = tuple(sorted(found))
        self.arrays: dict[str, list[np.ndarray]] = {}
        for field, shards in found.items():
            if sorted(shards) != list(range(count)):
                missing = sorted(set(range(count)) - set(shards))
                raise ConfigError(
                    f"shard folder {str(self.path)!r}: field {field!r} lacks shard(s) "
                    f"{missing[:5]} (every field needs shards 00000..{count - 1:05d})",
                    param="dataset",
                )
            self.arrays[field] = [_load(shards[k]) for k in range(count)]
        sizes = {f: [len(a) for a in arrs] for f, arrs in self.arrays.items()}
        if len({tuple(s) for s in sizes.values()}) != 1:
            raise ConfigError(
                f"shard folder {str(self.path)!r}: fields have shards of different lengths {sizes}",
                param="dataset",
            )
        for field, arrs in self.arrays.items():  # one example shape and dtype per field
            for k, a in enumerate(arrs[1:], 1):
                if a.shape[1:] != arrs[0].shape[1:] or a.dtype != arrs[0].dtype:
                    raise ConfigError(
                        f"shard {str(found[field][k])!r} holds {field} examples of shape "
                        f"{a.shape[1:]} {a.dtype}; shard 00000 holds {arrs[0].shape[1:]} "
                        f"{arrs[0].dtype}",
                        param="dataset",
                    )
        self.offsets = np.concatenate([[0], np.cumsum(sizes[self.fields[0]])])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def where(self, row: int) -> str:
        """``"shard 'DIR/x-00002.npy', row 17"``: where global row ``row`` of field ``x``
        lies (for messages)."""
        k = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return f"shard {str(self.path / f'x-{k:05d}.npy')!r}, row {row - int(self.offsets[k])}"

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {f: v[0] for f, v in self.gather(np.asarray([i])).items()}

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The examples ``idx`` (any order) as a dict of ``(len(idx), ...)`` arrays; each
        shard is read once, in increasing row order."""
        idx = np.asarray(idx, np.int64)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        out = {}
        for f in self.fields:
            arrs = self.arrays[f]
            parts = [arrs[s][sorted_idx[shard == s] - self.offsets[s]] for s in np.unique(shard)]
            rows = np.concatenate(parts) if parts else arrs[0][:0]
            result = np.empty_like(rows)
            result[order] = rows
            out[f] = result
        return out

    def example_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {f: (a[0].shape[1:], a[0].dtype) for f, a in self.arrays.items()}


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"shard {str(path)!r} is not a readable .npy file: {e}") from None


def write_shards(
    path: str | os.PathLike,
    data: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    *,
    shard_size: int | None = None,
) -> ShardedArrays:
    """Write ``data`` as a `ShardedArrays` folder, atomically (a hidden temporary folder
    renamed into place; nothing is left behind on failure).

    ``data`` is either a dict of arrays with a common leading axis, cut into shards of
    ``shard_size`` examples, or an iterable of such dicts, one per shard (to write a set
    larger than memory).

    Raises:
      ConfigError: ``path`` exists, or the fields or lengths of a shard disagree.
      WriteError: the disk refused a file.
    """
    final = Path(path)
    if final.exists():
        raise ConfigError(f"shard folder {str(final)!r} already exists", param="path")
    if isinstance(data, Mapping):
        n = len(next(iter(data.values())))
        size = check_int("shard_size", shard_size if shard_size is not None else n, low=1)
        arrays = data
        data = ({k: v[s : s + size] for k, v in arrays.items()} for s in range(0, n, size))
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fields = None
        for k, shard in enumerate(data):
            fields = _check_shard(shard, fields, k)
            for f, a in shard.items():
                np.save(tmp / f"{f}-{k:05d}.npy", np.ascontiguousarray(a), allow_pickle=False)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardedArrays(final)


def _check_shard(shard: Mapping[str, Any], fields: tuple | None, k: int) -> tuple:
    names = tuple(sorted(shard))
    if fields is not None and names != fields:
        raise ConfigError(f"shard {k} has fields {names}; shard 0 has {fields}", param="data")
    if not all(_SHARD.match(f"{f}-00000.npy") for f in names):
        raise ConfigError(f"field names must be identifiers; got {names}", param="data")
    lengths = {f: len(a) for f, a in shard.items()}
    if len(set(lengths.values())) != 1 or not min(lengths.values()):
        raise ConfigError(f"shard {k}: fields of different or zero lengths {lengths}", param="data")
    return names


@dataclass(frozen=True)
class ShardSplits:
    """A dataset on disk: ``DIR/train`` and ``DIR/test`` (and optionally ``DIR/val``) are
    `ShardedArrays` folders with fields ``x`` (inputs) and ``y`` (targets), and optionally
    ``mask`` (0/1, the targets' shape: the positions that count). Only the
    targets are read into memory (for the task and the output width, as for ``npz:``:
    see `jtricks.data.targets`)."""

    name: str
    train: ShardedArrays
    test: ShardedArrays
    val: ShardedArrays | None
    num_classes: int
    task: str = "classification"
    loss_floor: float | None = None
    targets: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.train.example_shapes()["x"][0]

    def stand_in(self) -> np.ndarray:
        """One zero row of the inputs' shape and dtype (for `jtricks.data.targets`)."""
        shape, dtype = self.train.example_shapes()["x"]
        return np.zeros((1, *shape), dtype)

    def for_task(self, task_name: str) -> ShardSplits:
        """These splits read for the task named ``task_name`` (a `Task.name`) when it is
        not their own: that task's output width (see `jtricks.data.datasets.for_task`)."""
        task = TASK_NAMES.get(task_name)
        if task is None or task == self.task or self.targets is None:
            return self
        where = f"dataset {self.name!r}"
        outputs = outputs_for(task, where, self.stand_in(), *self.targets)
        return dataclasses.replace(self, num_classes=outputs, task=task)


def is_shards_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("shards:")


def load_shards(spec: str) -> ShardSplits:
    """Open ``"shards:DIR"`` (see `ShardSplits`).

    Raises:
      ConfigError: a missing split folder, fields other than ``x`` and ``y``, targets of
        no task's kind (`jtricks.data.targets.infer_task`), or splits whose examples
        differ in shape.
    """
    root = Path(spec.partition(":")[2])
    if not root.is_dir():
        raise ConfigError(
            f"dataset {spec!r}: {str(root)!r} is not a folder; shards:DIR takes a folder "
            "with train/ and test/ shard folders",
            param="dataset",
        )
    splits = {}
    for split in ("train", "test", "val"):
        if split == "val" and not (root / split).exists():
            continue
        src = ShardedArrays(root / split)
        if set(src.fields) not in ({"x", "y"}, {"x", "y", "mask"}):
            raise ConfigError(
                f"dataset {spec!r}: {split}/ has fields {list(src.fields)}; it needs x and y "
                "(and optionally mask)",
                param="dataset",
            )
        splits[split] = src
    y, y_test = (
        np.concatenate([np.asarray(a) for a in splits[k].arrays["y"]]) for k in ("train", "test")
    )
    shapes = {k: v.example_shapes()["x"][0] for k, v in splits.items()}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"dataset {spec!r}: splits differ in example shape {shapes}")
    x = ShardSplits(spec, splits["train"], splits["test"], None, 1).stand_in()
    if np.issubdtype(x.dtype, np.complexfloating) or not (
        np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_
    ):
        raise ConfigError(
            f"dataset {spec!r}: x must be numeric (integer or real); got dtype {x.dtype}",
            param="dataset",
        )
    task = infer_task(f"dataset {spec!r}", x, y, y_test)
    outputs = outputs_for(task, f"dataset {spec!r}", x, y, y_test)
    masked = {k for k, v in splits.items() if "mask" in v.fields}
    if masked and (masked != set(splits) or task not in ("segmentation", "lm")):
        why = (
            f"the {task} task reads no mask (segmentation and lm do)"
            if masked == set(splits)
            else f"a mask in {sorted(masked)} but not in {sorted(set(splits) - masked)}"
        )
        raise ConfigError(f"dataset {spec!r}: {why}", param="dataset")
    return ShardSplits(
        spec, splits["train"], splits["test"], splits.get("val"), outputs, task, None, (y, y_test)
    )
