"""A user's own dataset by import path: ``--dataset mydata:load(split=0.2)``.

The path names a function (or class) whose literal arguments the spec gives; it returns a
`jtricks.data.Dataset`, or a mapping of NumPy-convertible arrays ``x``, ``y``, ``x_test``,
``y_test`` (``x_train``, ``y_train`` for the first two; optionally ``mask``,
``mask_test``), read exactly as an ``npz:`` file's are: the targets' kind and shape give
the task (`jtricks.data.targets`). New here: data in
any format a researcher's own code reads (HDF5, Parquet, a database) reach every task
and option without being written to a file first; failures are one line naming the
spec (`jtricks.imports`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.data.datasets import array_names, arrays_dataset
from jtricks.errors import ConfigError
from jtricks.imports import call_user, resolve_path
from jtricks.spec import parse_spec


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
    if not isinstance(found, Mapping):
        raise ConfigError(
            f"dataset {name!r} returned {type(found).__name__}; return a jtricks.data.Dataset "
            "or a dict of arrays x, y, x_test, y_test (optionally mask, mask_test)",
            param="dataset",
        )
    return arrays_dataset(spec, f"dataset {name!r}", mapping_arrays(f"dataset {name!r}", found))


def mapping_arrays(where: str, found: Mapping, given: str = "returned") -> dict[str, np.ndarray]:
    """The arrays of a mapping as an ``npz:`` file's reader takes them (`array_names`),
    as NumPy arrays; ``where`` names the source in errors ("``where`` ``given`` a mapping
    that lacks ...").

    Raises:
      ConfigError (``param="dataset"``): an array missing or not of numbers.
    """
    arrays: dict[str, Any] = {}
    for k, key in array_names(f"{where} {given} a mapping that", found).items():
        arrays[k] = np.asarray(found[key])
        if arrays[k].dtype == object:
            raise ConfigError(
                f"{where}: {key} is not an array of numbers (dtype object)", param="dataset"
            )
    return arrays


__all__ = ["mapping_arrays", "user_dataset"]
