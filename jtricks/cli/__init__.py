"""The ``jtricks`` command: ``train``, ``diagnose`` and ``bench``, one module each.

User errors (bad names, numbers, files, data) print one ``jtricks: error: ...``
line on stderr and exit with status 2, without a traceback; a run that cannot write
its files or read its stream stops with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

from jtricks.cli.common import Parser, QuietThreadTracebacks, flags_of, install_quiet_stderr
from jtricks.cli.interrupts import exit_on_signals
from jtricks.errors import ConfigError, Interrupted, StreamError, WriteError


def commands() -> dict[str, ModuleType]:
    """The command modules (imported here, after `main` has installed its signal
    handlers: importing them loads JAX)."""
    from jtricks.cli import bench, diagnose, search, train

    return {"train": train, "search": search, "diagnose": diagnose, "bench": bench}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``jtricks`` parser and each command's own parser."""
    from jtricks.version import __version__

    parser = Parser(prog="jtricks", description="JAX deep-learning training tricks.")
    parser.add_argument("--version", action="version", version=f"jtricks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, {name: module.add_parser(sub) for name, module in commands().items()}


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``<jtricks cache>/xla`` (see
    `jtricks.data.cache_dir`), so a program that took over a second to compile is loaded
    from disk by the next run with the same shapes and settings (another seed, a resume).

    Left alone when ``JTRICKS_COMPILATION_CACHE=0`` or when the user already set
    ``jax_compilation_cache_dir`` (``JAX_COMPILATION_CACHE_DIR``). Returns the folder in use.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if os.environ.get("JTRICKS_COMPILATION_CACHE", "1") == "0":
        return None
    from jtricks.data.datasets import cache_dir

    path = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jtricks`` console script; returns the exit status. SIGINT and
    SIGTERM end it at any moment with one line (`jtricks.cli.interrupts`)."""
    with exit_on_signals():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser, parsers = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command != "bench":  # the benchmark times compilation: no cache of jtricks'
        enable_compilation_cache()
    install_quiet_stderr()
    # what orbax leaves behind after a failed write, reported by then as one line
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    flags = flags_of(parsers[args.command])
    command = sys.modules[f"jtricks.cli.{args.command}"]
    import jax  # after parsing: --help answers without it

    try:
        return command.run(args, flags)
    except ConfigError as e:
        param = getattr(command, "PARAMS", {}).get(e.param, e.param)
        flag = flags.get(param or "")
        prefix = f"argument {flag}: " if flag else ""
        print(f"jtricks {args.command}: error: {prefix}{e}", file=sys.stderr)
        return 2
    except (WriteError, StreamError) as e:  # the run stops; what was saved stays
        lost_peer(args.command, e)  # a checkpoint's collective met a peer gone away
        print(f"jtricks {args.command}: error: {e}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError as e:
        lost_peer(args.command, e)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        print(
            f"jtricks {args.command}: error: the device ran out of memory ({first}); lower "
            "--batch-size (or --eval-batch-size), or the model's size",
            file=sys.stderr,
        )
        return 2
    except Interrupted as e:  # SIGTERM or Ctrl-C: the state reached was saved
        print(f"jtricks {args.command}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("jtricks: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        lost_peer(args.command, e)
        raise


def lost_peer(command: str, error: Exception) -> None:
    """End a process of a multi-process run whose peer went away with one line, at once
    (`jtricks.training.processes.leave`); any other error goes on."""
    from jtricks.training.processes import leave, lost_process

    if lost_process(error):
        first = str(error).strip().splitlines()[0]
        leave(
            f"jtricks {command}: error: another process of this run stopped ({first}); the "
            "last checkpoint is intact: start every process again with --resume RUN_DIR"
        )


__all__ = ["QuietThreadTracebacks", "build_parser", "commands", "enable_compilation_cache", "main"]
