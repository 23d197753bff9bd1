#!/usr/bin/env python3
"""Set up and run jtricks with nothing but Python 3.11+ and pip.

    python3 dev.py demo   # create .venv, install jtricks[dev], run `jtricks train` with its defaults
    python3 dev.py test   # create .venv, install jtricks[dev], run ruff (lint + format check) and
                          # pytest on 2 workers (JTRICKS_TEST_WORKERS=N to change)

Extra arguments after the command go to `jtricks train` (demo) or pytest (test).
The venv is reinstalled only when pyproject.toml changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
        workers = os.environ.get("JTRICKS_TEST_WORKERS", "2")
        run(BIN / "python", "-m", "pytest", "-n", workers, "--dist", "loadfile", *rest)


if __name__ == "__main__":
    main(sys.argv[1:])
