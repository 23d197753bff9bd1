"""User-facing errors.

`ConfigError` is raised for anything a user can fix by changing an argument: an
unknown name, a number out of range, a malformed file. It subclasses
`ValueError`, so library callers can catch either; the CLI turns it into a
one-line message and exit status 2, with no traceback.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Iterable


class WriteError(OSError):
    """A file of the run could not be written (no space, no permission, a quota): the
    message names the file and the cause. The CLI prints it as one line and exits with
    status 1; what was written before (the newest intact checkpoint) is left as it was,
    so ``--resume`` continues once the cause is fixed."""

    def __init__(self, path: object, cause: BaseException) -> None:
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else None
        errno = getattr(cause, "errno", None)
        found = re.search(r": ([^:\[]+) \[os_error_code='(\d+)'\]", str(cause))
        if why is None and found:  # orbax / tensorstore: "...: File too large [os_error_code='27']"
            why, errno = f"{found.group(1).strip()} (errno {found.group(2)})", int(found.group(2))
        why = why or f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        super().__init__(errno, f"cannot write {path}: {why}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.args[1]


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

    NaN and infinities always fail. A scalar array is checked by its value; a traced one
    (a hyper-parameter `optax.inject_hyperparams` puts in the state, as a search's trials
    do) passes: its value was checked as a number when the trial was built.
    """
    if getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) is not None:
        try:
            value = float(value)
        except Exception:  # a tracer: no value to check while tracing
            return
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
    """Return ``value`` as an int after checking it is an integer within ``[low, high]``;
    a NumPy integer (``np.int64`` from ``np.arange``) is one, a bool is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer; got {value!r}", param=name)
    value = int(value)
    check_range(name, value, low=low, high=high)
    return value


class StreamError(RuntimeError):
    """The training or evaluation stream failed (its iterator raised, or yielded a batch
    that does not match the first). The message names the stream, the batch and the
    cause; ``state`` holds the training state after the last completed step (nothing
    trained is lost), and a run's newest checkpoint is left intact. The CLI prints it as
    one line and exits with status 1."""

    def __init__(self, message: str, state: object = None) -> None:
        super().__init__(message)
        self.state = state


class Interrupted(RuntimeError):
    """A run stopped by SIGTERM or Ctrl-C (`jtricks.training.preemption.StopSignals`)
    after the program in flight, its state saved where the message says. ``status`` is
    the shell's exit status for the signal (143 for SIGTERM, 130 for SIGINT); the CLI
    prints the message as one line and exits with it."""

    def __init__(self, message: str, status: int = 130) -> None:
        super().__init__(message)
        self.status = status
