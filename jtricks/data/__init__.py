"""Datasets (T01, T02): registry, preprocessing fitted on training data, splits, batching."""

from jtricks.data.batching import epoch_indices
from jtricks.data.datasets import (
    DATASETS,
    Dataset,
    load_dataset,
    mnist1d,
    synthetic,
    validate_arrays,
)
from jtricks.data.preprocess import Scaler, select_classes, train_val_split

__all__ = [
    "DATASETS",
    "Dataset",
    "Scaler",
    "epoch_indices",
    "load_dataset",
    "mnist1d",
    "select_classes",
    "synthetic",
    "train_val_split",
    "validate_arrays",
]
