"""Shared fixtures: keys, a tiny dataset, and one optimizer object so compiled functions are reused."""

from __future__ import annotations

import jax
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
