"""Moved names: one table (`jtricks.moved.MOVED`), one module ``__getattr__`` per old
module, a `DeprecationWarning` naming the new home."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import jtricks
from jtricks import moved

PACKAGE = Path(jtricks.__file__).parent


def test_a_moved_name_warns_and_is_the_new_object():
    from jtricks.training import checkpoint
    from jtricks.training.checkpointer import Checkpointer

    with pytest.warns(DeprecationWarning, match=r"moved to jtricks\.training\.checkpointer"):
        old = checkpoint.Checkpointer
    assert old is Checkpointer
    with pytest.warns(DeprecationWarning, match="goes in jtricks 0.2"):
        from jtricks.training.checkpoint import Checkpointer as again  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        checkpoint.Nope  # noqa: B018


@pytest.mark.parametrize(("old", "new"), list(moved.MOVED.items()))
def test_every_entry_of_the_table_resolves(old, new):
    module, name = old
    with pytest.warns(DeprecationWarning):
        got = getattr(importlib.import_module(module), name)
    assert got is getattr(importlib.import_module(new[0]), new[1])


def test_module_getattr_is_only_the_moved_tables():
    """No module hand-writes its own ``__getattr__`` for old names (one mechanism)."""
    own = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                own.append(str(path.relative_to(PACKAGE)))
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "__getattr__" for t in node.targets
            ):
                own.append(str(path.relative_to(PACKAGE)))  # patching another module's
    assert own == []
