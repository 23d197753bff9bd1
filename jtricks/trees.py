"""Pytree helpers every layer shares."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def leaf_path(path: Any) -> str:
    """A key path as ``"Dense_0/kernel"``, whether its parts are dict keys, attributes or
    indices (`jax.tree_util.keystr` with ``simple=True, separator="/"``)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def named_leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    """The leaves of ``tree`` in flattening order, keyed by their path of names (dict keys,
    attributes and indices as strings). An NNX variable's trailing ``value`` is left out,
    so a Linen tree and an NNX state name a leaf alike: ``("Dense_0", "kernel")``,
    ``("layers", "0", "kernel")``."""
    return {path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def path_names(path: Any) -> tuple[str, ...]:
    """A key path's names, as `named_leaves` keys its leaves."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        return names[:-1]
    return names


ONE_REDUCTION = 2**20
"""Trees of at most this many elements are reduced in one pass by `tree_norm`."""


def tree_norm(tree: Any) -> jax.Array:
    """The global L2 norm ``sqrt(sum_i ||x_i||^2)`` over every leaf, in float32.

    The value of `optax.tree.norm`, which reduces each leaf on its own and adds the
    results. New here: a tree of at most `ONE_REDUCTION` elements is reduced as the
    concatenation of its raveled leaves, which XLA fuses into a single reduction; a small
    model's train step on a CPU otherwise paid one reduction kernel per leaf for each norm
    (the non-finite guard's gradient and parameter norms cost the MNIST-1D MLP's step
    about 10% against a hand-written scan; ``benchmarks/bench_fit.py``). Larger trees
    (where each leaf's reduction is long enough to be worth its kernel, and whose leaves
    may be sharded differently) are reduced leaf by leaf.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    if sum(jnp.size(x) for x in leaves) > ONE_REDUCTION:
        squares = [jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves]
        return jnp.sqrt(sum(squares))
    flat = jnp.concatenate([jnp.ravel(jnp.asarray(x, jnp.float32)) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(flat)))


def _is_key(a: Any) -> bool:  # a typed PRNG key array
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def key_data(tree: Any) -> Any:
    """Typed PRNG key leaves (a run's key, an NNX module's RNG streams) as their raw uint32
    data, as a checkpoint stores them (`jax.random.key_data`)."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def rng_streams(tree: Any) -> set[tuple[str, ...]]:
    """The paths (`path_names`) of a tree's RNG streams: the parents of its typed PRNG key
    leaves (an NNX module keeps a stream's key and its draw count there)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_names(p)[:-1] for p, a in leaves if _is_key(a)}


def wrap_keys(tree: Any, like: Any) -> Any:
    """Undo `key_data` where ``like`` (a tree of the same structure) holds a typed key,
    with that key's implementation."""

    def wrap(a, t):
        return jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)) if _is_key(t) else a

    return jax.tree.map(wrap, tree, like)
