"""Names that moved, kept importable from their old module for one minor version with a
`DeprecationWarning` (the guide's "What changed" lists them). Installed by the package's
``__init__``, so the old module does not import the new one (no import cycle)."""

from __future__ import annotations

import warnings
from typing import Any

from jtricks.training import checkpoint
from jtricks.training.checkpointer import Checkpointer


def _checkpoint_attribute(name: str) -> Any:
    """``jtricks.training.checkpoint.Checkpointer``: moved to `jtricks.training.checkpointer`
    (also `jtricks.training.Checkpointer`) on 2026-12-02."""
    if name == "Checkpointer":
        warnings.warn(
            "jtricks.training.checkpoint.Checkpointer moved: import it from "
            "jtricks.training (or jtricks.training.checkpointer); the old name goes in "
            "jtricks 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        return Checkpointer
    raise AttributeError(f"module {checkpoint.__name__!r} has no attribute {name!r}")


checkpoint.__getattr__ = _checkpoint_attribute  # PEP 562: consulted for missing names
