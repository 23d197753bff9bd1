"""Names that moved: one table, one lookup, one warning.

A module that lost a name keeps it importable for one minor version by one line,
``__getattr__ = moved.module_getattr(__name__)`` (PEP 562: Python consults a module's
``__getattr__`` for a name it does not have). The lookup finds the name in `MOVED`,
warns with a `DeprecationWarning` that names the new home, and imports the new home only
then, so the old module never imports it (no import cycle). The guide's "What changed"
table lists the same moves.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

MOVED: dict[tuple[str, str], tuple[str, str, str]] = {
    ("jtricks.training.checkpoint", "Checkpointer"): (
        "jtricks.training.checkpointer",
        "Checkpointer",
        "2026-12-02",
    ),
    ("jtricks.training.distributed", "INIT_TIMEOUT"): (
        "jtricks.training.processes",
        "INIT_TIMEOUT",
        "2026-12-06",
    ),
    ("jtricks.training.distributed", "within"): (
        "jtricks.training.processes",
        "within",
        "2026-12-06",
    ),
    ("jtricks.training.distributed", "initialize"): (
        "jtricks.training.processes",
        "initialize",
        "2026-12-06",
    ),
    ("jtricks.training.distributed", "detect_cluster"): (
        "jtricks.training.processes",
        "detect_cluster",
        "2026-12-06",
    ),
    ("jtricks.training.distributed", "initialize_from_cluster"): (
        "jtricks.training.processes",
        "initialize_from_cluster",
        "2026-12-06",
    ),
}
"""``{(old module, old name): (new module, new name, moved on)}``."""

REMOVED_IN = "0.2"


def attribute(module: str, name: str) -> Any:
    """The object ``module.name`` moved to, with a `DeprecationWarning` naming its new
    home; `AttributeError` for a name that never lived there."""
    if (module, name) not in MOVED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, new_name, _ = MOVED[module, name]
    warnings.warn(
        f"{module}.{name} moved to {new_module}.{new_name}; import it from there (the old "
        f"name goes in jtricks {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(new_module), new_name)


def module_getattr(module: str) -> Callable[[str], Any]:
    """A module's ``__getattr__`` that serves its moved names (`attribute`)."""

    def __getattr__(name: str) -> Any:
        return attribute(module, name)

    return __getattr__
