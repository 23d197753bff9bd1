"""Run folders: created empty, and written by one process at a time.

A run folder is locked with ``flock`` on the folder itself (no lock file is left behind):
the kernel releases the lock when the process ends, so a crashed run never leaves a
stale lock, and a second process that wants the same folder (a second ``--resume``, or
a new run racing for the same ``--out``) fails at once with a `ConfigError` (exit
status 2 on the CLI). For a new run the lock is taken right after the folder is made,
and the folder is checked empty *under* the lock, so two runs can never interleave in
one folder; for ``--resume`` it is taken before anything in the folder is read.

Where ``fcntl`` does not exist (Windows) folders are not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from jtricks.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, param: str = "out") -> Iterator[Path]:
    """Hold the exclusive lock of the folder ``path`` for the ``with`` block.

    Raises:
      ConfigError: another process holds it (``param`` names the flag to blame).
    """
    path = Path(path)
    if fcntl is None:
        yield path
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"run folder {str(path)!r} is in use by another jtricks process (one writer "
                "per folder); wait for it to end or choose another folder",
                param=param,
            ) from None
        yield path
    finally:
        os.close(fd)


def create_run_dir(out: str | os.PathLike, stack: contextlib.ExitStack | None = None) -> Path:
    """Make the new, empty run folder ``out``; with ``stack``, lock it until the stack closes.

    Raises:
      ConfigError: ``out`` is empty, is a file, holds anything, cannot be created, or is
        locked by another process.
    """
    if not str(out).strip():
        raise ConfigError("out must name a folder; got an empty string", param="out")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"output folder {str(path)!r} is a file; give a folder that does not exist yet "
            "or is empty",
            param="out",
        )
    _refuse_non_empty(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create output directory {str(path)!r}: {e.strerror}", param="out"
        ) from None
    if stack is not None:
        stack.enter_context(locked(path, param="out"))
        _refuse_non_empty(path)  # another run may have written between the check and the lock
    return path


def _refuse_non_empty(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"output directory {str(path)!r} already exists and is not empty; "
            "choose a new --out so no earlier run is overwritten",
            param="out",
        )
