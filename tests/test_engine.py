"""The engine's shape: a warm `fit` runs code in few files, and every program of a run is
a call of the one part program (`jtricks.training.epoch.make_part_program`)."""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jtricks
from jtricks.nn import build_model
from jtricks.training import create_train_state, fit

PACKAGE = Path(jtricks.__file__).parent
MAX_FILES = 14

MODEL = build_model("mlp(features=(8,))", 2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    xv = rng.normal(size=(32, 6)).astype(np.float32)
    return (x, (x[:, 0] > 0).astype(np.int32)), (xv, (xv[:, 0] > 0).astype(np.int32))


def files_run_by(fn) -> collections.Counter:
    """The files of `jtricks` whose Python code runs during ``fn()`` (every call event,
    by file), measured with `sys.setprofile`."""
    seen: collections.Counter = collections.Counter()
    root = str(PACKAGE)

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(root):
            seen[str(Path(name).relative_to(PACKAGE))] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_a_warm_fit_runs_code_in_few_files(data):
    """In-memory arrays, validation data and per-step records: once compiled, a `fit`
    call runs code in at most `MAX_FILES` files of the package."""
    train, val = data
    kw = dict(val_data=val, batch_size=16, epochs=2, log_every_steps=1)
    state = create_train_state(MODEL, optax.adam(1e-2), train[0], jax.random.key(0))
    state, history = fit(state, train, **kw)  # compiles
    assert history.steps and "val_loss" in history[-1]
    files = files_run_by(lambda: fit(state, train, **kw))
    assert "training/loop.py" in files and "training/fit.py" in files  # it measured the fit
    assert len(files) <= MAX_FILES, sorted(files)


def _calls_of(name: str) -> list[str]:
    """``module:line`` of every call of a function named ``name`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if called == name:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_one_part_program_factory_and_one_host_part_loop():
    """The step loop (`run_steps`) is compiled in one place, the part program; the host
    loop over parts (`run_epoch`) is called from the epoch loop only."""
    assert [c.split(":")[0] for c in _calls_of("run_steps")] == ["training/epoch.py"]
    assert [c.split(":")[0] for c in _calls_of("make_part_program")] == [
        "training/compiled.py",
        "training/epoch.py",
    ]
    assert [c.split(":")[0] for c in _calls_of("run_epoch")] == ["training/loop.py"]
