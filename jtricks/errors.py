"""User-facing errors.

`ConfigError` is raised for anything a user can fix by changing an argument: an
unknown name, a number out of range, a malformed file. It subclasses
`ValueError`, so library callers can catch either; the CLI turns it into a
one-line message and exit status 2, with no traceback.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad argument from the user: the message names it, its value and what is allowed.

    ``param`` optionally names the offending argument (e.g. ``"batch_size"``), so
    the CLI can point at its flag.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def unknown_name(
    what: str, name: object, valid: Iterable[str], *, param: str | None = None
) -> ConfigError:
    """Error for an unknown registry name that lists the valid ones; ``param`` defaults to ``what``."""
    valid = sorted(valid)
    names = ", ".join(valid)
    return ConfigError(
        f"unknown {what} {name!r}; valid {what}s are: {names}{did_you_mean(str(name), valid)}",
        param=param or what,
    )


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean: a, b?"`` for the close matches of ``name`` (``""`` if none)."""
    close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.6)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise `ConfigError` unless ``low <= value <= high`` (bounds optional, inclusivity set).

    NaN and infinities always fail.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number; got {value!r}", param=name)
    ok = math.isfinite(value)  # rejects NaN and +-inf
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else (f"{low} <= " if low_inclusive else f"{low} < ")
        hi = "" if high is None else (f" <= {high}" if high_inclusive else f" < {high}")
        raise ConfigError(f"{name} must satisfy {lo}{name}{hi}; got {value!r}", param=name)


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as int after checking it is an integer within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer; got {value!r}", param=name)
    check_range(name, value, low=low, high=high)
    return value
