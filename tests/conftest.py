"""Shared fixtures: keys, a tiny dataset, and one optimizer object so compiled functions are
reused.

The tests compile hundreds of tiny programs and run each for milliseconds, so XLA's CPU
backend compiles them cheaply (`TEST_XLA_FLAGS`, inherited by the subprocesses the tests
start): without LLVM's optimisations (``--xla_backend_optimization_level=0``: the whole
suite in 790 s instead of 900 s at level 1 on the 2-core machine) and with the older
loop emitters in place of the MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``:
five representative `jtricks.train` runs compile their 87 programs in 4.2 s instead of
10.0 s at level 0). The same programs; the rounding moves a little (the fused
optimizer's parameters 1.6e-6 from optax's, relative, after three steps;
`tests/test_fused.py` allows 4e-6). A flag of your own in ``XLA_FLAGS`` wins, and a flag
this jaxlib does not know is left out (XLA aborts on one); benchmarks and users keep
XLA's default. What level 0 costs: code XLA writes itself runs unoptimised, so a dilated
convolution (``fcn1d``; Eigen's convolutions are precompiled and unaffected) trains
about 6x slower (the guide's segmentation example, 2000 examples for 5 epochs: 42 s
against 6.9 s at level 1): keep such tests small.
"""

from __future__ import annotations

import os
import subprocess
import sys

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA accepts ``flag`` (tried in a subprocess: XLA aborts the
    process on an unknown flag)."""
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0


def _with_test_xla_flags(flags: str) -> str:
    """``flags`` and `TEST_XLA_FLAGS`, but for those named there already (yours win; the
    pytest-xdist workers inherit the controller's) and those this XLA does not know."""
    missing = [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in flags]
    added = [f for f in missing if f == TEST_XLA_FLAGS[0] or _xla_knows(f)]
    return " ".join([flags, *added]).strip()


os.environ["XLA_FLAGS"] = _with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))

# after XLA_FLAGS: the backend reads them when it starts
import jax  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from jtricks.data import synthetic  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache directory, and share compiled
    programs through one persistent XLA cache (`_shared_xla_cache`)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JTRICKS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    _shared_xla_cache(mp, tmp_path_factory)
    yield
    mp.undo()


def _shared_xla_cache(mp: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """One persistent XLA compilation cache for this test run: its workers and every
    process they start (CLI runs, examples, benchmarks) compile the same small programs
    again and again; from the second time on they load them from disk. Every program is
    kept, however fast it compiled: a process pays its many small compilations anew
    (CLI, examples and families tests: 135 and 137 s with programs over 0.2 s kept, 127
    and 131 s with all; the whole suite 849 s before, 655 s after, on the 2-core
    machine). ``JTRICKS_TEST_XLA_CACHE=0`` turns it off;
    a ``JAX_COMPILATION_CACHE_DIR`` of your own wins."""
    if os.environ.get("JTRICKS_TEST_XLA_CACHE") == "0" or os.environ.get(
        "JAX_COMPILATION_CACHE_DIR"
    ):
        return
    root = tmp_path_factory.getbasetemp()
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of a run
    path = str((root.parent if run else root) / "xla-cache")
    for name, value in (
        ("JAX_COMPILATION_CACHE_DIR", path),
        ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    ):
        mp.setenv(name, value)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


SLOWEST_FILES = (
    "test_distributed.py",
    "test_guide.py",
    "test_examples.py",
    "test_cli_families.py",
    "test_diagnostics.py",
    "test_gpu_suite.py",
    "test_cli.py",
)
"""The test files that take longest (seconds of one worker on the 2-core machine: 172,
111, 92, 67, 66, 47, 42 of the suite's 1221), slowest first."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the slowest files first, the rest in their usual order. `dev.py test` gives
    pytest-xdist whole files in this order (``--dist loadfile --no-loadscope-reorder``):
    longest first, so the two workers end together (ordered by test count instead, the
    guide's file came last and one worker waited 62 s for the other)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's caches of compiled programs after each test file: a worker that keeps
    every program of the suite grows past 4 GB, and the files rarely share programs
    (the session fixtures below still share theirs within a file)."""
    yield
    jax.clear_caches()


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(scope="session")
def tiny_data():
    """200 train / 100 test examples of 16 features, 4 well-separated classes."""
    return synthetic(num_train=200, num_test=100, shape=(16,), num_classes=4, noise=0.5, seed=0)


@pytest.fixture(scope="session")
def adam():
    """One shared optimizer object: equal objects let jit reuse compiled epochs across tests."""
    return optax.adam(1e-2)
