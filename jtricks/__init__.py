"""jtricks: a JAX toolkit of deep-learning training tricks.

Flax Linen models, optax gradient transformations, and JIT-compiled training
loops whose epochs run as one compiled `lax.scan` of static length on device.

The names below are imported on first use (PEP 562), so ``import jtricks`` (and the
``jtricks`` command's first line, which installs its signal handlers) does not wait for
JAX; ``jtricks.training``, ``jtricks.data`` and the other subpackages load the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

from jtricks.version import __version__

_HOMES = {
    "ConfigError": "jtricks.errors",
    "Dataset": "jtricks.data",
    "Scaler": "jtricks.data",
    "load_dataset": "jtricks.data",
    "train_val_split": "jtricks.data",
    "build_model": "jtricks.nn",
    "build_optimizer": "jtricks.optim",
    "RunResult": "jtricks.run",
    "TrainConfig": "jtricks.run",
    "load_run": "jtricks.run",
    "train": "jtricks.run",
    "FitOptions": "jtricks.training",
    "History": "jtricks.training",
    "TrainState": "jtricks.training",
    "clear_caches": "jtricks.training",
    "create_train_state": "jtricks.training",
    "evaluate": "jtricks.training",
    "fit": "jtricks.training",
    "predict": "jtricks.training",
}

_SUBPACKAGES = (
    "bench",
    "cli",
    "configs",
    "data",
    "diagnostics",
    "losses",
    "nn",
    "optim",
    "run",
    "search",
    "tasks",
    "training",
)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"jtricks.{name}")
    else:
        raise AttributeError(f"module 'jtricks' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES, *_SUBPACKAGES})


__all__ = ["__version__", *_HOMES]
