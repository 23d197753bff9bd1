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
    assert own == ["__init__.py"]  # the root's lazy names (PEP 562), not old names


def test_the_roots_names_load_lazily_and_resolve():
    """``import jtricks`` loads no JAX (the command installs its signal handlers first);
    every public name and subpackage resolves on first use."""
    import subprocess
    import sys

    code = "import sys, jtricks; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import jtricks

    for name in jtricks.__all__:
        assert getattr(jtricks, name) is not None
    assert jtricks.training.fit is jtricks.fit
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        jtricks.nope  # noqa: B018
