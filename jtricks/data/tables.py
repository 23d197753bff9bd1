"""Tables in CSV files as datasets: ``csv:PATH`` (``--dataset csv:data.csv``).

A header row names the columns; one of them is the target (``target=``, default the
last), every other one a numeric feature. The test split is a second file with the same
columns (``test=``) or ``test_fraction`` of the rows, drawn with ``seed`` (per class for
class labels). The targets' kind gives the task, as for an ``npz:`` file
(`jtricks.data.targets`): whole numbers from 0 to 1023 are class labels, other numbers
(a price, a year, a decimal) regression targets, and text is class names, numbered in
sorted order (``--task`` may name another task that reads them, e.g. ``regression`` for
small whole-number counts, or ``classification`` for -1/+1 labels, which then are
classes named by their values: `jtricks.data.datasets.named_labels`). The delimiter
is found among comma, semicolon and tab.

New here: pandas and scikit-learn read tables, but a run needs them as checked arrays
with a split and a task; a cell that is not a number, or is empty, is refused naming its
file, line and column (encode categories or drop the column first), never read as NaN.
"""

from __future__ import annotations

import csv as csv_module
from pathlib import Path

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.data.datasets import arrays_dataset
from jtricks.data.preprocess import train_val_split
from jtricks.data.targets import label_names
from jtricks.errors import ConfigError, check_range

DELIMITERS = ",;\t"
MAX_LABEL = 1024
"""Whole-number targets below it (and not negative) are class labels; any other is a
regression target: 250,000 as a label would ask for a head of 250,001 classes."""


def csv(
    path: str,
    target: str | None = None,
    test: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """The table in ``path`` as a dataset (see the module docstring).

    Raises:
      ConfigError (``param="dataset"``): naming the file: missing or empty, no such
        ``target`` column, a test file with other columns, a cell that is not a number
        (line and column), a test class name the training rows lack.
    """
    header, rows = _read(path)
    name = header[-1] if target is None else target
    if name not in header:
        raise _error(path, f"has no column {name!r}; its columns: {', '.join(header)}")
    features = [c for c in header if c != name]
    if not features:
        raise _error(path, f"has no feature column beside the target {name!r}")
    x, y = _numbers(path, header, rows, features), _column(path, rows, header.index(name))
    if test is None:
        check_range("test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False)
        y, y_test, names = _targets(path, y, [])
        labels = y.dtype.kind == "i"
        try:
            x, y, x_test, y_test = train_val_split(x, y, test_fraction, seed=seed, stratify=labels)
        except ConfigError as e:  # its words are val_fraction's
            raise _error(path, f"cannot hold out test_fraction={test_fraction}: {e}") from None
    else:
        test_header, test_rows = _read(test)
        if sorted(test_header) != sorted(header):
            raise _error(test, f"has columns {test_header}; {path!r} has {header}")
        x_test = _numbers(test, test_header, test_rows, features)
        y_test = _column(test, test_rows, test_header.index(name))
        y, y_test, names = _targets(path, y, y_test, test)
    arrays = {"x": x, "y": y, "x_test": x_test, "y_test": y_test}
    return arrays_dataset(f"csv:{path}", f"dataset file {path!r}", arrays, classes=names)


def _error(path: str, what: str) -> ConfigError:
    return ConfigError(f"dataset file {str(path)!r} {what}", param="dataset")


def _read(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows of a CSV file (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise _error(path, "does not exist" if not p.exists() else "is not a file")
    text = p.read_text(encoding="utf-8-sig", errors="replace")
    try:
        dialect = csv_module.Sniffer().sniff(text[:65536], delimiters=DELIMITERS)
    except csv_module.Error:  # one column, or no delimiter it can tell: commas
        dialect = csv_module.excel
    table = [row for row in csv_module.reader(text.splitlines(), dialect) if any(row)]
    if len(table) < 2:
        raise _error(path, "needs a header row and at least one data row")
    header = [c.strip() for c in table[0]]
    for line, row in enumerate(table[1:], start=2):
        if len(row) != len(header):
            raise _error(path, f"line {line}: {len(row)} cells, the header has {len(header)}")
    return header, table[1:]


def _column(path: str, rows: list[list[str]], index: int) -> list[str]:
    """The target cells, stripped; an empty one names its line."""
    cells = [row[index].strip() for row in rows]
    if "" in cells:
        raise _error(path, f"line {cells.index('') + 2}: the target cell is empty")
    return cells


def _numbers(path: str, header: list[str], rows: list[list[str]], names: list[str]) -> np.ndarray:
    """The ``names`` columns of ``rows`` as float32 ``(N, F)``; a cell that is not a
    number names its line and column."""
    index = [header.index(n) for n in names]
    out = np.empty((len(rows), len(names)), np.float32)
    for i, row in enumerate(rows):
        for j, k in enumerate(index):
            try:
                out[i, j] = float(row[k])
            except ValueError:
                raise _error(
                    path,
                    f"line {i + 2}, column {names[j]!r}: {row[k]!r} is not a number (encode "
                    "categories as numbers, or drop the column; an empty cell is a missing "
                    "value to fill first)",
                ) from None
    return out


def _targets(path: str, train: list[str], test: list[str], test_path: str = "") -> tuple:
    """Both splits' target cells as arrays and the class names: int64 labels for whole
    numbers in ``[0, MAX_LABEL)`` or class names (numbered in sorted order of the training
    split's names: `jtricks.data.targets.label_names`), else float32."""
    cells = train + test
    try:
        values = np.asarray([float(c) for c in cells])
    except ValueError:
        names, labels, unseen = label_names(train, test)
        if unseen:
            raise _error(test_path, f"has class(es) {unseen[:5]} the training rows lack") from None
        return labels[: len(train)], labels[len(train) :], names
    whole = all(c.lstrip("+-").isdigit() for c in cells)
    labels = whole and 0 <= values.min() and values.max() < MAX_LABEL
    values = values.astype(np.int64) if labels else values.astype(np.float32)
    return values[: len(train)], values[len(train) :], None
