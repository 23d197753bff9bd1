"""`jtricks.trees.tree_norm`: the global L2 norm, one fused reduction for small trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks import trees


def _tree():
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(7, 5)).astype(np.float32),
        "b": [
            rng.normal(size=(3,)).astype(np.float32),
            jnp.asarray(rng.normal(size=(2, 2)), jnp.bfloat16),
        ],
    }


@pytest.mark.parametrize("one_reduction", [2**20, 1])  # concatenated, and leaf by leaf
def test_tree_norm_is_the_float64_norm_and_optax_s(monkeypatch, one_reduction):
    monkeypatch.setattr(trees, "ONE_REDUCTION", one_reduction)
    tree = _tree()
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    expected = np.sqrt(sum(np.sum(v * v) for v in leaves))
    got = jax.jit(trees.tree_norm)(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # optax: bf16 squares
    np.testing.assert_allclose(float(got), float(optax.tree.norm(as_f32)), rtol=1e-5)


def test_tree_norm_flags_overflow_and_nan():
    assert not np.isfinite(float(trees.tree_norm({"w": jnp.full((3,), 1e20)})))  # squares to inf
    assert not np.isfinite(float(trees.tree_norm([jnp.asarray([1.0, jnp.nan])])))
    assert float(trees.tree_norm({})) == 0.0
