#!/usr/bin/env python3
"""Set up and run jtricks with nothing but Python 3.11+ and pip.

    python3 dev.py demo   # create .venv, install jtricks[dev], run `jtricks train` with its defaults
    python3 dev.py test   # create .venv, install jtricks[dev], run ruff (lint + format check) and
                          # pytest on 2 workers (JTRICKS_TEST_WORKERS=N to change)

Extra arguments after the command go to `jtricks train` (demo) or pytest (test).
The venv is reinstalled only when pyproject.toml changes.

`test` guards against the two ways a test run on a shared machine can fail without a test
failing: a worker process killed by the native code under it (XLA aborting) and a run that
never ends. pytest-xdist replaces a crashed worker and then waits forever when tests are
grouped by file (its `--dist loadfile` scheduler re-queues the finished files;
pytest-dev/pytest-xdist#1378), so a crash ends the run instead (`--max-worker-restart 0`),
and the whole suite runs once more, saying why; a failing test is never retried. A test
running for 5 minutes dumps every thread's stack (`faulthandler_timeout`), and a run past
`JTRICKS_TEST_TIMEOUT` seconds (default 2700) is killed with status 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("JTRICKS_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".jtricks-installed"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    status = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if status != 0:
        # pytest's 5 ("no tests collected") is a failure here like any other non-zero status
        sys.exit(status)


CRASHED = "crashed while running"  # how pytest-xdist reports a worker that died


def run_tests(cmd: list[str | Path], timeout: float) -> tuple[int, bool]:
    """Run the pytest command ``cmd``, echoing its output; return its status and whether a
    worker crashed. Past ``timeout`` seconds the run and its children are killed."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    crashed = False
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            crashed = crashed or CRASHED in line
        status = proc.wait()
    except KeyboardInterrupt:  # the run is in a session of its own: pass Ctrl-C on
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        sys.exit(130)
    finally:
        timer.cancel()
        proc.stdout.close()
    if status == -signal.SIGKILL:
        print(f"dev.py: the test run passed {timeout:.0f} s and was killed", flush=True)
        return 1, False
    return status, crashed


def test(workers: str, rest: list[str], python: str | Path = BIN / "python") -> None:
    """pytest on ``workers`` processes with ``rest`` appended; a run ended by a crashed
    worker runs once more. Exits with the status of a run that failed."""
    cmd = [
        python,
        "-m",
        "pytest",
        "-n",
        workers,
        "--dist",
        "loadfile",
        "--no-loadscope-reorder",  # the slowest files first (tests/conftest.py)
        "--max-worker-restart",
        "0",
        "-o",
        "faulthandler_timeout=300",
        "--durations",
        "10",
        *rest,
    ]
    timeout = float(os.environ.get("JTRICKS_TEST_TIMEOUT", "2700"))
    status, crashed = run_tests(cmd, timeout)
    if status != 0 and crashed:
        print(
            "dev.py: a test worker crashed (above); running the whole suite once more", flush=True
        )
        status, _ = run_tests(cmd, timeout)
    if status != 0:
        sys.exit(status)


def setup() -> None:
    pyproject = ROOT / "pyproject.toml"
    if STAMP.exists() and STAMP.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    if not (BIN / "python").exists():
        print(f"+ creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]")
    STAMP.touch()


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("setup", "demo", "test"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    setup()
    if command == "demo":
        run(BIN / "jtricks", "train", *rest)
    elif command == "test":
        run(BIN / "ruff", "check", ".")
        run(BIN / "ruff", "format", "--check", ".")
        # two workers, one test file each at a time (module fixtures are not built twice):
        # JAX compiles on one core, so this halves the suite on a 2-core machine
        test(os.environ.get("JTRICKS_TEST_WORKERS", "2"), rest)


if __name__ == "__main__":
    main(sys.argv[1:])
