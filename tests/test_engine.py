"""The engine's shape: a warm `fit` runs code in few files, and every program of a run is
a call of the one part program (`jtricks.training.epoch.make_part_program`)."""

from __future__ import annotations

import ast
import collections
import re
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


@pytest.fixture(scope="module")
def warm_fit_files(data) -> list[str]:
    """The files a warm `fit` (in-memory arrays, validation data, per-step records) runs
    code in, in the order it first enters them."""
    train, val = data
    kw = dict(val_data=val, batch_size=16, epochs=2, log_every_steps=1)
    state = create_train_state(MODEL, optax.adam(1e-2), train[0], jax.random.key(0))
    state, history = fit(state, train, **kw)  # compiles
    assert history.steps and "val_loss" in history[-1]
    return list(files_run_by(lambda: fit(state, train, **kw)))


def test_a_warm_fit_runs_code_in_few_files(warm_fit_files):
    assert "training/loop.py" in warm_fit_files and "training/fit.py" in warm_fit_files
    assert len(warm_fit_files) <= MAX_FILES, warm_fit_files


def test_the_design_notes_list_how_a_batch_flows(warm_fit_files):
    """`docs/design.md`'s "How a batch flows" list is the measured list, in order."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    section = text.split("**How a batch flows.**", 1)[1].split("\n* **", 1)[0]
    listed = re.findall(r"^\s+\d+\. `([^`]+)`", section, flags=re.M)
    assert listed == warm_fit_files


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
    """The step loop (`run_steps`) is compiled in one place, the part program; `fit`
    (through `compiled.part_program`, which ensembles and search trials share), the LR
    finders and the bench's trials build it with the one factory; the host loop over
    parts (`run_epoch`) is called from the epoch loop only."""
    assert [c.split(":")[0] for c in _calls_of("run_steps")] == ["training/epoch.py"]
    assert sorted({c.split(":")[0] for c in _calls_of("make_part_program")}) == [
        "bench/trials.py",
        "diagnostics/lr_finder.py",
        "training/compiled.py",
        "training/epoch.py",
    ]
    assert [c.split(":")[0] for c in _calls_of("run_epoch")] == ["training/loop.py"]
