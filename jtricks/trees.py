"""Pytree helpers every layer shares."""

from __future__ import annotations

from typing import Any

import jax


def leaf_path(path: Any) -> str:
    """A key path as ``"Dense_0/kernel"``, whether its parts are dict keys, attributes or
    indices (`jax.tree_util.keystr` with ``simple=True, separator="/"``)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")
