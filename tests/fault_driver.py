"""Runs `jtricks train` in a subprocess and kills itself with SIGKILL at a chosen point.

Usage: python tests/fault_driver.py MODE EPOCH -- jtricks-train-args...
  MODE "epoch": SIGKILL while epoch EPOCH is being computed (after its dispatch).
  MODE "save":  SIGKILL while the checkpoint of epoch EPOCH is being written (its arrays
                are on disk, its manifest is not, nothing is committed).
  MODE "chunk": (streaming runs) SIGKILL after the EPOCH-th compiled chunk was dispatched.
  MODE "fail":  (streaming runs) the EPOCH-th batch read from the data source raises OSError.
  MODE "term":  sends itself SIGTERM (SIGINT with "int") after the EPOCH-th dispatch of a
                compiled part of an epoch (in-memory runs with --chunk) or stream chunk;
                the run is expected to save and exit, not to die.
Test-only fault injection; the library has no hooks for it.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    # run as from a terminal, whatever this process inherited (a shell starts background
    # jobs with SIGINT ignored, and jtricks leaves an ignored signal ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode, epoch = sys.argv[1], int(sys.argv[2])
    args = sys.argv[4:]
    import importlib

    importlib.import_module("jtricks.cli.train")  # every module bound as a run binds it
    # (import jtricks is lazy: a module first imported after a patch below would bind
    # the patched function and count its own calls too)
    manifest = importlib.import_module("jtricks.training.manifest")

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "epoch":

        def at_epoch(feed, kw):  # a whole in-memory epoch's program, of that epoch
            return kw["finish"] and kw["length"] and int(getattr(feed, "epoch", -2)) + 1 == epoch

        _patch_program(at_epoch, die)
    elif mode == "save":
        original_write = manifest._write_json

        def write(path, obj):
            if path.name == "manifest.json" and path.parent.name == f".tmp-epoch-{epoch:06d}":
                die()
            return original_write(path, obj)

        manifest._write_json = write
    elif mode == "chunk":
        calls = [0]

        def at_chunk(feed, kw):  # the epoch-th chunk in flight on the device
            calls[0] += bool(kw["length"])
            return bool(kw["length"]) and calls[0] == epoch

        _patch_program(at_chunk, die)
    elif mode == "fail":
        stream = importlib.import_module("jtricks.data.stream")
        original_read = stream.read_rows
        reads = [0]

        def read(*a, **k):
            reads[0] += 1
            if reads[0] == epoch:
                raise OSError(5, "Input/output error (injected)")
            return original_read(*a, **k)

        stream.read_rows = read
    elif mode in ("term", "int"):
        if "--process-id" in args and args[args.index("--process-id") + 1] != "1":
            pass  # several processes: only process 1 gets the signal, the others agree
        else:
            _signal_after_parts(epoch, signal.SIGTERM if mode == "term" else signal.SIGINT)
    from jtricks.cli import main as cli_main

    sys.exit(cli_main(["train", *args]))


def _patch_program(when, then) -> None:
    """Wrap the part program `fit` looks up (`jtricks.training.compiled.part_program`) so
    that ``then()`` runs right after a dispatch for which ``when(feed, kwargs)`` holds."""
    import importlib

    compiled = importlib.import_module("jtricks.training.compiled")
    original = compiled.part_program

    def patched(*a, **k):
        program = original(*a, **k)

        def run(state, acc, feed, *rest, **kw):
            out = program(state, acc, feed, *rest, **kw)
            if when(feed, kw):
                then()
            return out

        return run

    compiled.part_program = patched


def _signal_after_parts(count: int, signum: int) -> None:
    """Send ``signum`` to this process after the ``count``-th part or chunk dispatch (not
    counting a whole in-memory epoch's program, the zeroing or the epoch's end)."""
    from jtricks.training.epoch import ArrayFeed

    calls = [0]

    def counted(feed, kw):
        if kw["length"] and not (kw["finish"] and isinstance(feed, ArrayFeed)):
            calls[0] += 1
            return calls[0] == count
        return False

    _patch_program(counted, lambda: os.kill(os.getpid(), signum))


if __name__ == "__main__":
    main()
