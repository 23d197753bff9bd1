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
    mode, epoch = sys.argv[1], int(sys.argv[2])
    args = sys.argv[4:]
    import importlib

    ckpt = importlib.import_module("jtricks.training.checkpoint")
    fit_mod = importlib.import_module("jtricks.training.compiled")  # where fit looks it up

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "epoch":
        original = fit_mod.compiled_functions

        def patched(*a, **k):
            run_epoch, evaluate = original(*a, **k)

            def run(state, data, data_key, ep, *rest, **kw):
                out = run_epoch(state, data, data_key, ep, *rest, **kw)
                if int(ep) + 1 == epoch:
                    die()  # the epoch is in flight on the device
                return out

            return run, evaluate

        fit_mod.compiled_functions = patched
    elif mode == "save":
        original_write = ckpt._write_json

        def write(path, obj):
            if path.name == "manifest.json" and path.parent.name == f".tmp-epoch-{epoch:06d}":
                die()
            return original_write(path, obj)

        ckpt._write_json = write
    elif mode == "chunk":
        streaming = importlib.import_module("jtricks.training.streaming")
        original_make = streaming.make_chunk_fn
        calls = [0]

        def make(*a, **k):
            run_chunk = original_make(*a, **k)

            def run(*args):
                out = run_chunk(*args)
                calls[0] += 1
                if calls[0] == epoch:
                    die()  # the chunk is in flight on the device
                return out

            return run

        streaming.make_chunk_fn = make
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


def _signal_after_parts(count: int, signum: int) -> None:
    """Send ``signum`` to this process after the ``count``-th part or chunk dispatch."""
    import importlib

    epoch_mod = importlib.import_module("jtricks.training.epoch")
    streaming = importlib.import_module("jtricks.training.streaming")
    calls = [0]

    def counted(fn):
        def run(*a, **k):
            out = fn(*a, **k)
            calls[0] += 1
            if calls[0] == count:
                os.kill(os.getpid(), signum)
            return out

        for name in ("init",):
            if hasattr(fn, name):
                setattr(run, name, getattr(fn, name))
        return run

    original_part, original_chunk = epoch_mod.make_part_fn, streaming.make_chunk_fn
    epoch_mod.make_part_fn = lambda *a, **k: counted(original_part(*a, **k))
    streaming.make_chunk_fn = lambda *a, **k: counted(original_chunk(*a, **k))


if __name__ == "__main__":
    main()
