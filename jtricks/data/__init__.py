"""Datasets: registry, preprocessing fitted on training data, splits, batching,
shards on disk and streams of host batches."""

from jtricks.data.batching import epoch_indices
from jtricks.data.dataset import Dataset, validate_arrays
from jtricks.data.datasets import DATASETS, mnist1d, synthetic
from jtricks.data.memory import in_memory
from jtricks.data.preprocess import Scaler, select_classes, train_val_split
from jtricks.data.registry import load_dataset
from jtricks.data.shards import ShardedArrays, write_shards
from jtricks.data.stream import BatchStream, EpochBatches, SequentialBatches

__all__ = [
    "DATASETS",
    "BatchStream",
    "Dataset",
    "EpochBatches",
    "Scaler",
    "SequentialBatches",
    "ShardedArrays",
    "epoch_indices",
    "in_memory",
    "load_dataset",
    "mnist1d",
    "select_classes",
    "synthetic",
    "train_val_split",
    "validate_arrays",
    "write_shards",
]
