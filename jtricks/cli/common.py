"""What every ``jtricks`` command shares: one-line argparse errors, quiet thread
tracebacks, the flag a config error points at."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``jtricks train: error: argument --lr: ...`` and a
    pointer to ``--help`` instead of the whole usage (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's destination -> its first flag (``learning_rate`` -> ``--lr``), read
    from the parser itself, so an error names the flag the user typed."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


class QuietThreadTracebacks:
    """``sys.stderr`` for the CLI, dropping whole tracebacks that other threads print and
    that end in ``RuntimeError: Event loop is closed``: tensorstore callbacks reaching an
    event loop orbax already closed after a failed checkpoint write (the failure itself
    is reported as one line). Everything else passes through unchanged."""

    NOISE = "RuntimeError: Event loop is closed"

    def __init__(self, stream) -> None:
        self._stream = stream
        self._held: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        ident = threading.get_ident()
        if ident == threading.main_thread().ident:
            return self._stream.write(text)
        held = self._held.get(ident)
        if held is None and not text.startswith("Traceback (most recent call last)"):
            return self._stream.write(text)
        held = self._held.setdefault(ident, [])
        held.append(text)
        block = "".join(held)
        last = block.rstrip("\n").rsplit("\n", 1)[-1]
        if block.endswith("\n") and last and not last.startswith((" ", "Traceback")):
            del self._held[ident]  # the traceback's final line: drop noise, print the rest
            if last != self.NOISE:
                self._stream.write(block)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def refuse_beside_resume(own: str, typed: list[str]) -> None:
    """``--resume`` continues with the folder's ``own`` file; ``typed`` are the other
    flags given with it (refused, named).

    Raises:
      ConfigError (``param="resume"``).
    """
    if typed:
        from jtricks.errors import ConfigError

        raise ConfigError(
            f"--resume continues with the {own}; do not also give {', '.join(typed)}",
            param="resume",
        )


def install_quiet_stderr() -> None:
    """Wrap ``sys.stderr`` in `QuietThreadTracebacks` (once)."""
    if not isinstance(sys.stderr, QuietThreadTracebacks):
        sys.stderr = QuietThreadTracebacks(sys.stderr)
