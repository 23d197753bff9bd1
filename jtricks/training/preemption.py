"""Stopping a run cleanly on SIGTERM or Ctrl-C: `StopSignals`, the flag `fit` polls.

A preempted job gets SIGTERM some seconds before it is killed (SLURM with
``--signal``, Kubernetes' grace period, a spot VM's notice); Ctrl-C sends SIGINT. Python's
default turns SIGINT into a `KeyboardInterrupt` wherever the main thread is, and SIGTERM
kills the process at once: either way the epoch in progress is lost, and an exception
raised inside a checkpoint write can leave a writer thread waiting forever. Inside
``with StopSignals() as stop:`` both signals only set a flag; ``fit(..., stop=stop)``
reads it between compiled programs (an epoch, a part of a long epoch, a stream's chunk:
no per-step host round trip), finishes the program in flight, hands the state to every
callback's ``on_interrupt`` (a `jtricks.training.Checkpointer` writes it as
``checkpoints/interrupted/``) and returns with ``history.interrupted`` set. A second
signal of the same kind restores Python's default, so a second Ctrl-C ends the process
the usual way. New here: orbax's ``reached_preemption`` asks a multi-host coordination
service; this is the single-process signal side, polled where the loop already returns
to the host.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import numpy as np


class StopSignals:
    """A context that turns ``signals`` (default SIGTERM and SIGINT) into a flag.

    ``is_set()`` says whether one arrived, ``signal`` which (its number) and ``name``
    its name. Handlers can only be installed from the main thread; elsewhere the context
    installs nothing (the flag can still be set by `request`). A signal the process
    inherited as ignored (a shell starts background jobs with SIGINT ignored, so that the
    terminal's Ctrl-C leaves them alone) stays ignored. A second signal of the same kind
    gets the disposition that was there before: the default ends the process at once.

    Example:
      >>> with StopSignals() as stop:
      ...     state, history = fit(state, data, batch_size=100, epochs=50, stop=stop)
      >>> if history.interrupted:
      ...     print("stopped at step", history.interrupted["step"])
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.signal: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the run to stop, as the signal ``signum`` would."""
        if self.signal is None:
            self.signal = signum
        self._event.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self._event.is_set() and signum == self.signal:  # the second one: the default
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.request(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # ignored on purpose by whoever started the process
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def stop_requested(stop: Any) -> bool:
    """Whether ``stop`` (``None``, an object with ``is_set()`` such as `StopSignals` or a
    `threading.Event`, or a callable returning a bool) asks the run to stop."""
    if stop is None:
        return False
    is_set = getattr(stop, "is_set", None)
    return bool(is_set() if is_set is not None else stop())


class AgreedStop:
    """``stop`` as every process of a multi-process run sees it: set once any process's
    flag is set, decided by one small all-gather per question (`fit` asks between
    programs, every process at the same point, since they run in lockstep), so all
    processes stop after the same program and save the same step together."""

    def __init__(self, stop: Any) -> None:
        self.stop, self.agreed = stop, False
        self.signal: int | None = None

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

    def is_set(self) -> bool:
        """Whether any process's flag is set (its signal: the first process's that has
        one; -1 stands for a flag set without a signal)."""
        if not self.agreed:
            from jax.experimental import multihost_utils

            mine = getattr(self.stop, "signal", None) or -1 if stop_requested(self.stop) else 0
            flags = np.ravel(multihost_utils.process_allgather(np.int32(mine)))
            self.agreed = bool(np.any(flags))
            self.signal = next((int(f) for f in flags if f > 0), None)
        return self.agreed


def exit_status(stop: Any) -> int:
    """The shell's status for a run stopped by ``stop``'s signal: ``128 + signum``
    (143 for SIGTERM, 130 for SIGINT); 130 when no signal is known (`status_of`)."""
    return status_of(getattr(stop, "name", None))


def status_of(name: str | None) -> int:
    """The shell's status for a run stopped by the signal named ``name`` (a
    ``history.interrupted["signal"]``): ``128 + signum``; 130 for anything else."""
    members = signal.Signals.__members__
    return 128 + int(members[name]) if name in members else 128 + int(signal.SIGINT)


__all__ = ["AgreedStop", "StopSignals", "exit_status", "status_of", "stop_requested"]
