"""Shared fixtures: keys, a tiny dataset, and one optimizer object so compiled functions are
reused.

The tests compile hundreds of tiny programs and run each for milliseconds, so XLA's CPU
backend compiles them with LLVM's light optimisation level
(``--xla_backend_optimization_level=1``, inherited by the subprocesses the tests start):
the same programs, compiled in about three quarters of the time. Level 0 would be faster
still, but it rounds differently enough to move the fused optimizer 1.6e-6 away from
optax's (`tests/test_fused.py` allows 1e-6). An ``--xla_backend_optimization_level`` of
your own in ``XLA_FLAGS`` wins; benchmarks and users keep XLA's default.
"""

from __future__ import annotations

import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # yours wins
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1"]
    ).strip()

import jax  # after XLA_FLAGS: the backend reads them when it starts
import optax
import pytest

from jtricks.data import synthetic


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JTRICKS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


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
