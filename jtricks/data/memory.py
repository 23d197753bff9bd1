"""Arrays in memory as a dataset a run can name: ``jtricks.train(dataset=arrays)``.

A run's config is JSON and names what it builds (``mnist1d``, ``npz:PATH``,
``mydata:load``), so that its folder loads (`jtricks.load_run`) and resumes. Arrays a
Python session holds have no such name: `in_memory` gives them one from their contents,
``memory:`` and the first 16 hex digits of their SHA-256 (`Dataset.digest`, with the
class names where given), and holds them in this process under it, where `load_dataset`
finds them (the ``memory:`` loader). The same arrays get the same name in any process,
so a run folder trained on them resumes in a new session once `in_memory` has been given
them again (`jtricks.load_run` needs only the folder); other arrays get another name, so
a run never resumes on data it did not start with. The last `HELD` datasets are held: a
notebook that trains on many keeps its memory bounded.

New here: `jtricks.train`, `jtricks.search` and run folders take a researcher's arrays
without a file or a module of their own first; `fit` took them already, without the
run's split, preprocessing, test metrics and folder.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from jtricks.data.dataset import Dataset
from jtricks.data.datasets import ARRAYS, arrays_dataset
from jtricks.data.user import mapping_arrays
from jtricks.errors import ConfigError

HELD = 8
"""How many datasets this process holds at most; the least recently used goes first."""

_held: OrderedDict[str, Dataset] = OrderedDict()


def in_memory(data: Any) -> str:
    """Hold ``data`` in this process and return its dataset spec, ``memory:<digest>``,
    for `jtricks.train`, `jtricks.search` (``TrainConfig(dataset=...)``) and
    `load_dataset`. ``jtricks.train(dataset=data)`` calls it for you. The arrays are held
    as given, not copied: changed in place afterwards, their name no longer says what
    they hold.

    Args:
      data: a `Dataset`; a mapping of arrays ``x``, ``y``, ``x_test``, ``y_test`` (or
        ``x_train``, ``y_train``; optionally ``x_val`` with ``y_val``, ``mask`` with
        ``mask_test``), read as an ``npz:`` file's arrays are (the targets' kind and shape
        give the task: labels, regression targets, tokens, labels per position); or a
        tuple ``(x, y, x_test, y_test)``.

    Raises:
      ConfigError (``param="dataset"``): another object, or arrays an ``npz:`` file could
        not hold (missing, not numbers, empty, of mismatched shapes).

    Example:
      >>> spec = in_memory({"x": x, "y": y, "x_test": x_test, "y_test": y_test})
      >>> jtricks.train(dataset=spec, model="mlp", out="runs/mine")
      >>> jtricks.train(resume="runs/mine")  # in a new session: in_memory(the same arrays) first
    """
    dataset = _as_dataset(data)
    digest = dataset.digest()
    if dataset.classes is not None:  # the same labels under other names: other data
        digest = hashlib.sha256("\n".join([digest, *dataset.classes]).encode()).hexdigest()
    spec = f"memory:{digest[:16]}"
    if spec not in _held:
        _held[spec] = dataset  # the run reads its digest again: computed once
    _held.move_to_end(spec)
    while len(_held) > HELD:
        _held.popitem(last=False)
    return spec


def memory(path: str) -> Dataset:
    """The dataset held as ``memory:<path>`` (the registry's ``memory:`` loader).

    Raises:
      ConfigError (``param="dataset"``): no such dataset held in this process.
    """
    spec = f"memory:{path}"
    if spec not in _held:
        raise ConfigError(
            f"dataset {spec!r} names arrays held in memory (jtricks.data.in_memory) by the "
            f"process that trained on them, and this process does not hold them (it holds the "
            f"last {HELD} given); give it the same arrays first: jtricks.data.in_memory(arrays) "
            f"returns {spec!r} for them (for the command line, save them with numpy.savez and "
            "name npz:PATH)",
            param="dataset",
        )
    _held.move_to_end(spec)
    return _held[spec]


def _as_dataset(data: Any) -> Dataset:
    """``data`` as a `Dataset` (see `in_memory`)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple | list) and len(data) == len(ARRAYS):
        data = dict(zip(ARRAYS, data, strict=True))
    if not isinstance(data, Mapping):
        shown = f"an object of type {type(data).__name__}"
        if isinstance(data, tuple | list):
            shown = f"a {type(data).__name__} of {len(data)}"
        raise ConfigError(
            "dataset must be a spec string, a jtricks.data.Dataset, a dict of arrays x, y, "
            f"x_test, y_test or a tuple (x, y, x_test, y_test); got {shown}",
            param="dataset",
        )
    where = "dataset in memory"
    return arrays_dataset(where, where, mapping_arrays(where, data, given="is"))


__all__ = ["HELD", "in_memory", "memory"]
