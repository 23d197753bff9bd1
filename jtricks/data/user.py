"""A user's own dataset by import path: ``--dataset mydata:load(split=0.2)``.

The path names a function (or class) whose literal arguments the spec gives; it returns a
`jtricks.data.Dataset`, or a mapping of NumPy-convertible arrays ``x``, ``y``, ``x_test``,
``y_test`` (optionally ``mask``, ``mask_test``), read exactly as an ``npz:`` file's are:
the targets' kind and shape give the task (`jtricks.data.targets`). New here: data in
any format a researcher's own code reads (HDF5, Parquet, a database) reach every task
and option without being written to a file first; failures are one line naming the
spec (`jtricks.imports`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.data.datasets import MASKS, arrays_dataset
from jtricks.errors import ConfigError
from jtricks.imports import call_user, resolve_path
from jtricks.spec import parse_spec

ARRAYS = ("x", "y", "x_test", "y_test")


def user_dataset(spec: str) -> Dataset:
    """The dataset ``spec`` (``"module:factory(args)"``) returns.

    Raises:
      ConfigError (``param="dataset"``): an import or a call that fails, or a result that
        is neither a `Dataset` nor a mapping of the four arrays.
    """
    name, args, kwargs = parse_spec(spec, what="dataset")
    found = call_user(resolve_path(name, what="dataset"), args, kwargs, what="dataset", name=name)
    if isinstance(found, Dataset):
        return found
    missing = [k for k in ARRAYS if not isinstance(found, Mapping) or k not in found]
    if missing:
        got = f"a mapping without {missing}" if isinstance(found, Mapping) else type(found).__name__
        raise ConfigError(
            f"dataset {name!r} returned {got}; return a jtricks.data.Dataset or a dict of "
            "arrays x, y, x_test, y_test (optionally mask, mask_test)",
            param="dataset",
        )
    arrays: dict[str, Any] = {}
    for k in (*ARRAYS, *MASKS):
        if k in found:
            arrays[k] = np.asarray(found[k])
            if arrays[k].dtype == object:
                raise ConfigError(
                    f"dataset {name!r}: {k} is not an array of numbers (dtype object)",
                    param="dataset",
                )
    return arrays_dataset(spec, f"dataset {name!r}", arrays)


__all__ = ["user_dataset"]
