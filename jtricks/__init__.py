"""jtricks: a JAX toolkit of deep-learning training tricks.

Flax Linen models, optax gradient transformations, and JIT-compiled training
loops whose epochs run as one compiled `lax.scan` of static length on device.
"""

from jtricks.data import Dataset, Scaler, load_dataset, train_val_split
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.optim import build_optimizer
from jtricks.run import RunResult, TrainConfig, train
from jtricks.training import (
    FitOptions,
    History,
    TrainState,
    clear_caches,
    create_train_state,
    evaluate,
    fit,
)
from jtricks.version import __version__

__all__ = [
    "ConfigError",
    "Dataset",
    "FitOptions",
    "History",
    "RunResult",
    "Scaler",
    "TrainConfig",
    "TrainState",
    "__version__",
    "build_model",
    "build_optimizer",
    "clear_caches",
    "create_train_state",
    "evaluate",
    "fit",
    "load_dataset",
    "train",
    "train_val_split",
]
