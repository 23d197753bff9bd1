"""SIGINT and SIGTERM from the ``jtricks`` command's first line to its last.

`exit_on_signals` is entered before anything heavy is imported (``import jtricks`` loads
its names lazily, so this runs within milliseconds of the interpreter's start). Until
training starts, and again after it, a signal ends the process at once with one line
on stderr and the shell's status (130 for SIGINT, 143 for SIGTERM), after taking back
what the run made so far (`jtricks.rundir.undo_new_runs`: a new run folder with nothing
trained in it disappears; a trained one stays, and the line says how to continue it).
While `fit` trains, `jtricks.training.preemption.StopSignals` takes the signals over
(the run saves where it is) and hands them back when it returns.

Why not Python's default: SIGTERM kills the process without a word, and Ctrl-C's
`KeyboardInterrupt` can land inside a garbage-collection callback of JAX, which prints
"Exception ignored" and trains on. The handler here never raises: it exits, and it
runs in the main thread as soon as the interpreter regains control (after an XLA call
in flight returns, within seconds). A signal the process inherited as ignored stays
ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    del frame
    from jtricks.rundir import undo_new_runs

    kept = undo_new_runs()
    line = f"jtricks: interrupted ({signal.Signals(signum).name})"
    if kept:
        search = (kept[0] / "search.json").is_file()
        what = "its finished trials" if search else "its newest checkpoint"
        line += (
            f"; {kept[0]} keeps what was trained ({what}): "
            f"jtricks {'search' if search else 'train'} --resume {kept[0]}"
        )
    else:
        line += "; nothing was written"
    os.write(2, (line + "\n").encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM (not inherited as ignored) exit at once with
    one line (`_exit_now`); the previous handlers come back after it. From the main
    thread only (elsewhere it does nothing)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _exit_now)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
