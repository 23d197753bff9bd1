"""A user's own code by import path, ``"module:attribute"``, as `--model` and `--optimizer`
name it.

The module is imported as ``python -m`` would (the working directory is tried too), and
whatever goes wrong in the user's code becomes one `ConfigError` line naming the flag,
the path and the cause: a module that cannot be found, that fails on import (any
exception, a syntax error) or that calls ``sys.exit`` while it is imported, a missing
attribute (with the close matches), and a factory that raises. New here: Python's own
import machinery lets each of those escape as a different exception, or end the process.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from jtricks.errors import ConfigError, did_you_mean
from jtricks.spec import call_with_checked_args


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r})"
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def import_module(module_name: str, *, what: str, spec: str) -> Any:
    """Import ``module_name`` (from the working directory too).

    Raises:
      ConfigError (``param=what``): not found, an error while it is imported, or a
        ``sys.exit`` there; the message names ``spec`` and the cause.
    """
    try:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(os.getcwd())
    except (Exception, SystemExit) as e:
        verb = "cannot import" if isinstance(e, ImportError) else "error while importing"
        raise ConfigError(
            f"{what} {spec!r}: {verb} module {module_name!r}: {_first_line(e)}", param=what
        ) from None


def public_callables(module: Any) -> list[str]:
    """The names of a module's public callables (for close-match hints)."""
    return [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]


def resolve_path(name: str, *, what: str) -> Callable[..., Any]:
    """The callable ``"module:attribute"`` names (a dotted attribute path is followed).

    Raises:
      ConfigError (``param=what``): see `import_module`; a missing or non-callable
        attribute, with the module's close matches.
    """
    module_name, attr = name.split(":", 1)
    if not module_name or not attr:
        raise ConfigError(
            f"{what} {name!r}: an import path is module:attribute, e.g. mymodels:Net",
            param=what,
        )
    obj = import_module(module_name, what=what, spec=name)
    owner = obj
    for part in attr.split("."):
        owner, obj = obj, getattr(obj, part, None)
        if obj is None:
            raise ConfigError(
                f"unknown {what} {name!r}: {module_name} has no {attr!r}"
                + did_you_mean(part, public_callables(owner)),
                param=what,
            )
    if not callable(obj):
        raise ConfigError(
            f"{what} {name!r}: {attr!r} is a {type(obj).__name__}, not a class or function",
            param=what,
        )
    return obj


def accepts(fn: Callable[..., Any], keyword: str) -> bool:
    """Whether ``fn`` has a parameter named ``keyword`` (for a class, its constructor's:
    a metaclass may hide it from ``inspect.signature(cls)``, as NNX's does)."""
    targets = [fn, fn.__init__] if isinstance(fn, type) else [fn]
    for target in targets:
        try:
            if keyword in inspect.signature(target).parameters:
                return True
        except (TypeError, ValueError):
            continue
    return False


def call_user(fn: Callable[..., Any], args: tuple, kwargs: dict, *, what: str, name: str) -> Any:
    """``fn(*args, **kwargs)``, a user's factory: any exception it raises (or a
    ``sys.exit``) becomes a `ConfigError` naming ``what`` and ``name``."""
    try:
        return call_with_checked_args(fn, args, kwargs, what=f"{what} {name!r}")
    except ConfigError as e:
        raise ConfigError(str(e), param=e.param or what) from None
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{what} {name!r} failed: {_first_line(e)}", param=what) from None


__all__ = ["accepts", "call_user", "import_module", "public_callables", "resolve_path"]
