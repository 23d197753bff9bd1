"""Named recipes: one module per recipe, each a `get_config()` of `TrainConfig` fields.

A recipe module's docstring gives the command that runs it and what it reaches; the
fields it does not set keep `TrainConfig`'s defaults. ``jtricks train --recipe NAME``
starts from one, and the flags typed after it win.
"""

from __future__ import annotations

import importlib
from typing import Any

NAMES = ("default", "tricks", "tricks_wide")


def get_config(name: str) -> dict[str, Any]:
    """The settings of recipe ``name`` (a fresh dict), or ``KeyError`` for an unknown one."""
    if name not in NAMES:
        raise KeyError(name)
    return dict(importlib.import_module(f"jtricks.configs.{name}").get_config())
