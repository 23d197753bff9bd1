"""A whole run from a config: `TrainConfig`, the named recipes, and `train`.

Modules, in the order a run uses them: `config` (the settings, each declared once),
`data` (load, split, preprocess, stream), `build` (task, model, optimizer, callbacks),
`runner` (`train`'s phases; an ensemble's N members stacked in one state), `options`
(the config as `fit`'s options), `load` (a run folder back in Python) and `outputs`
(metrics, curves, summary).
"""

from __future__ import annotations

import re
from typing import Any

from jtricks.configs import NAMES, get_config
from jtricks.errors import ConfigError, unknown_name
from jtricks.run.config import TrainConfig
from jtricks.run.load import LoadedRun, load_run
from jtricks.run.outputs import MetricsLog, RunResult, main_metric, plot_curves
from jtricks.run.runner import train
from jtricks.rundir import environment, write_json

RECIPES: dict[str, dict[str, Any]] = {name: get_config(name) for name in NAMES}
"""Every recipe's settings by name (`jtricks.configs`)."""


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """The `TrainConfig` of recipe ``name`` (`jtricks.configs`); keyword overrides win, and
    an ``epochs`` override drops the recipe's ``steps``.

    Raises:
      ConfigError: unknown name (listing the valid ones) or field, or settings that do
        not go together; the message names what the recipe set that it mentions
        (``--recipe tricks --ensemble 2``: ``tta`` set by the recipe).
    """
    if name not in NAMES:
        raise unknown_name("recipe", name, NAMES)
    settings = {**get_config(name), **overrides}
    if "epochs" in overrides and "steps" not in overrides:
        settings.pop("steps", None)
    config = TrainConfig.from_dict(settings)
    try:
        config.validate()  # here, where it can say which settings the recipe made
    except ConfigError as e:
        said = str(e)
        set_by = [
            k for k in get_config(name) if k not in overrides and re.search(rf"\b{k}\b", said)
        ]
        if not set_by:
            raise
        what = ", ".join(f"{k}={settings[k]!r}" for k in set_by)
        raise ConfigError(
            f"{said} ({what} set by recipe {name!r}; give it to override)", param=e.param
        ) from None
    return config


__all__ = [
    "RECIPES",
    "LoadedRun",
    "MetricsLog",
    "RunResult",
    "TrainConfig",
    "environment",
    "load_run",
    "main_metric",
    "plot_curves",
    "recipe",
    "train",
    "write_json",
]
