"""Run folders: created empty, written by one process at a time, and file by file atomically.

The helpers every command shares (train, diagnose, bench) live here, below all of them:
`create_run_dir` / `locked` for the folder, `atomic_write` / `write_json` /
`write_text` / `write_jsonl` for its files (readers never see half a file),
`default_out` for the folder's default name and `environment` for the versions
recorded beside every run.

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
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jtricks.errors import ConfigError, WriteError

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
    try:
        created = not path.exists()
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"output folder {str(path)!r} is a file; give a folder that does not exist yet "
                "or is empty",
                param="out",
            )
        _refuse_non_empty(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # writable (a read-only mount, a quota)?
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"cannot write output folder {str(path)!r}: {why}", param="out") from None
    if stack is not None:
        stack.enter_context(locked(path, param="out"))
        _refuse_non_empty(path)  # another run may have written between the check and the lock
        _NEW_RUNS[path] = created
        stack.callback(_NEW_RUNS.pop, path, None)
    return path


_NEW_RUNS: dict[Path, bool] = {}
"""The folders of the new runs this process has in progress (each locked by
`create_run_dir`, until its stack closes), and whether the run created the folder."""


def undo_new_runs() -> list[Path]:
    """Take back what each new run in progress made where nothing was trained yet
    (`clear_untrained`): what a signal does before it ends the process. Returns the
    folders kept because training wrote into them."""
    return [path for path, created in list(_NEW_RUNS.items()) if not clear_untrained(path, created)]


def clear_untrained(path: Path, created: bool) -> bool:
    """Empty ``path`` (and remove it when the run ``created`` it) unless it holds
    anything training made (a checkpoint or an epoch record); whether it was cleared."""
    if not path.is_dir():
        return True
    if _trained(path):
        return False
    for entry in path.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if created:
        path.rmdir()
    return True


@contextlib.contextmanager
def refused_cleanly(out: str | os.PathLike | None) -> Iterator[None]:
    """Around a new run: a `ConfigError` raised before anything was trained (no
    checkpoint, no epoch record) takes the run folder's files with it, and the folder when
    this run created it, so a refusal that comes after the folder exists (a mesh that
    does not divide the batch, a data file refused as it is read) leaves what was there.
    Only a folder this process claimed for a new run (`create_run_dir`, checked empty
    under its lock) is ever touched: ``out`` given as a folder that holds anything is
    refused and left exactly as it was."""
    try:
        yield
    except ConfigError:
        path = None if out is None else Path(out)
        if path in _NEW_RUNS:
            clear_untrained(path, _NEW_RUNS[path])
        raise


def _trained(path: Path) -> bool:
    """Whether a run folder holds anything training made: a checkpoint, an epoch record,
    or a search's finished trial."""
    records = [path / "metrics.jsonl", path / "trials.jsonl"]
    checkpoints = path / "checkpoints"
    has_records = any(r.is_file() and r.stat().st_size > 0 for r in records)
    return has_records or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def check_writable(folder: str | os.PathLike, param: str) -> None:
    """Make ``folder`` if needed and check a file can be written in it: one `ConfigError`
    naming it (and ``param``) before training, not a writer thread's traceback later."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"cannot write {str(path)!r}: {why}", param=param) from None


def _refuse_non_empty(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"output directory {str(path)!r} already exists and is not empty; "
            "choose a new --out so no earlier run is overwritten",
            param="out",
        )


def default_out(kind: str) -> str:
    """The default run folder of a command: ``runs/<kind>-<YYYYmmdd-HHMMSS>``."""
    return str(Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S"))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it to
    ``path``: a reader sees the old file or the whole new one, never half of it.

    Raises:
      WriteError: the file could not be written (naming it and the cause); the
        temporary file is removed.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (one trailing newline)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Atomically write ``records`` as JSON lines, one object a line."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def environment() -> dict[str, Any]:
    """Versions and device of this process, recorded beside every run."""
    import flax
    import jax
    import jaxlib
    import optax

    from jtricks.version import __version__

    dev = jax.devices()[0]
    return {
        "jtricks": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }
