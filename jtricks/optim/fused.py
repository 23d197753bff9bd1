"""Fused multi-tensor execution of an element-wise optimizer chain.

Why: a model with L parameter leaves makes an optax update cost L small fused
kernels on an accelerator (a few microseconds each even inside ``lax.scan``), and
every jit call that passes the train state in and out pays a dispatch cost that grows
with the number of arrays (``benchmarks/bench_optimizer_update.py`` measures both).

What: `fused(tx)` runs ``tx`` over ONE contiguous 1-D buffer per group of leaves
(a group is a dtype, split by default into matrices and vectors so that the default
weight-decay mask is uniform per buffer). The update then costs the same few
kernels whatever the number of leaves.

* `Flat` is the pytree of those buffers; its static `Layout` knows every leaf's path,
  shape, dtype, group and offset. `Layout.flatten` concatenates a tree into buffers,
  `Flat.unflatten` cuts them back with `jax.lax.split` (whose transpose is one
  concatenate, so the gradient with respect to a `Flat` comes out flat in one copy).
* `fused(tx)` is an ordinary `optax.GradientTransformation`. Called with trees it
  flattens at the boundary (drop-in anywhere optax is used); called with `Flat` params
  and gradients (as the jtricks train step does when the optimizer state is a
  `FusedState`) it runs on the buffers directly and returns a `Flat` update.
* Element-wise transforms (SGD, momentum, Adam, RMSProp, Adagrad, Adadelta, value
  clipping, penalties, schedules) need nothing: ``jax.tree.map`` over a `Flat` maps over
  its buffers. Global norms (``optax.tree.norm``) are the same sum over all entries.
  jtricks' own masked transforms (`jtricks.optim.transforms.masked`) evaluate their mask on
  the tree the layout describes and select per buffer (free when a buffer is uniformly
  masked, one ``where`` otherwise); `clip_per_leaf_norm` computes per-leaf norms on the
  segments. A raw `optax.masked` / `optax.multi_transform` inside ``tx`` would evaluate its
  mask on the buffers, so `fused` refuses it with a clear error.

What is new here (optax has ``flatten``, which ravels everything into one float
buffer at the boundary of every update, and no masked or per-leaf support): one buffer
per dtype group, the flat train-state path, masks and per-leaf norms on segments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jtricks.errors import ConfigError
from jtricks.trees import leaf_path

GroupBy = str | Callable[[str, Any], Hashable]
GROUP_BY = ("weights", "dtype")


@dataclasses.dataclass(frozen=True)
class Group:
    """One contiguous buffer: ``leaves`` (indices in tree order), their ``sizes`` and the dtype."""

    name: str
    dtype: np.dtype
    leaves: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of how a parameter tree maps onto per-group 1-D buffers
    (hashable: it is the aux data of `Flat`, so jit caches on it)."""

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    groups: tuple[Group, ...]

    @classmethod
    def of(cls, tree: Any, group_by: GroupBy = "weights") -> Layout:
        """The layout of ``tree``. ``group_by``: ``"weights"`` (dtype, and ``ndim >= 2`` or not),
        ``"dtype"``, or ``(path, leaf) -> key`` for custom groups (e.g. by a mask you use)."""
        if isinstance(tree, Flat):
            return tree.layout
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if not leaves_with_paths:
            raise ConfigError("fused: the parameter tree has no leaves", param="params")
        paths = tuple(leaf_path(p) for p, _ in leaves_with_paths)
        leaves = [leaf for _, leaf in leaves_with_paths]
        shapes = tuple(tuple(int(d) for d in np.shape(leaf)) for leaf in leaves)
        dtypes = tuple(np.dtype(jnp.result_type(leaf)) for leaf in leaves)
        keys = [_group_key(group_by, path, leaf) for path, leaf in zip(paths, leaves, strict=True)]
        order: dict[Hashable, list[int]] = {}
        for i, k in enumerate(keys):
            order.setdefault(k, []).append(i)
        groups = tuple(
            Group(
                name=_group_name(k),
                dtype=dtypes[idx[0]],
                leaves=tuple(idx),
                sizes=tuple(int(np.prod(shapes[i], dtype=np.int64)) for i in idx),
            )
            for k, idx in order.items()
        )
        return cls(treedef, paths, shapes, dtypes, groups)

    def flatten(self, tree: Any) -> Flat:
        """Concatenate ``tree``'s leaves into the layout's buffers (one copy)."""
        if isinstance(tree, Flat):
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"tree structure {treedef} does not match the layout's {self.treedef}")
        buffers = []
        for g in self.groups:
            parts = [jnp.ravel(leaves[i]).astype(g.dtype) for i in g.leaves]
            buffers.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
        return Flat(tuple(buffers), self)

    def unflatten(self, buffers: Sequence[jax.Array]) -> Any:
        """Cut buffers back into the tree (`jax.lax.split`, then reshape)."""
        leaves: list[Any] = [None] * len(self.shapes)
        for g, buf in zip(self.groups, buffers, strict=True):
            parts = [buf] if len(g.leaves) == 1 else jax.lax.split(buf, g.sizes)
            for i, part in zip(g.leaves, parts, strict=True):
                leaves[i] = part.reshape(self.shapes[i])
        return jax.tree.unflatten(self.treedef, leaves)

    def abstract(self) -> Any:
        """The tree as `jax.ShapeDtypeStruct` leaves (what masks are evaluated on)."""
        return jax.tree.unflatten(
            self.treedef,
            [jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes, strict=True)],
        )

    def per_leaf(self, values: Any) -> list[list[Any]]:
        """Split a tree with this layout's structure (e.g. a mask) into per-group lists."""
        leaves = jax.tree.leaves(values)
        if len(leaves) != len(self.shapes):
            raise ValueError(
                f"expected a tree with {len(self.shapes)} leaves (one per parameter); got {len(leaves)}"
            )
        return [[leaves[i] for i in g.leaves] for g in self.groups]


def _check_group_by(group_by: GroupBy) -> None:
    if not (isinstance(group_by, str) and group_by in GROUP_BY) and not callable(group_by):
        raise ConfigError(
            f"group_by must be one of {', '.join(GROUP_BY)} or a callable (path, leaf) -> key; "
            f"got {group_by!r}",
            param="group_by",
        )


def _group_key(group_by: GroupBy, path: str, leaf: Any) -> Hashable:
    _check_group_by(group_by)
    dtype = np.dtype(jnp.result_type(leaf))
    if group_by == "dtype":
        return (dtype.name,)
    if group_by == "weights":
        return (dtype.name, "matrix" if np.ndim(leaf) >= 2 else "vector")
    return (dtype.name, group_by(path, leaf))


def _group_name(key: tuple) -> str:
    return "/".join(str(k) for k in key)


@jax.tree_util.register_pytree_node_class
class Flat:
    """A parameter tree stored as one 1-D buffer per group (see `Layout`). A pytree whose
    leaves are the buffers, so ``jax.tree.map``, ``optax.apply_updates`` and
    ``optax.tree.norm`` work on it unchanged."""

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: Sequence[Any], layout: Layout):
        self.buffers = tuple(buffers)
        self.layout = layout

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout, buffers):
        return cls(buffers, layout)

    def unflatten(self) -> Any:
        """The parameter tree (slices of the buffers; differentiable)."""
        return self.layout.unflatten(self.buffers)

    def __repr__(self) -> str:
        parts = ", ".join(f"{g.name}[{g.size}]={len(g.leaves)} leaves" for g in self.layout.groups)
        return f"Flat({parts})"


def flatten_params(params: Any, *, group_by: GroupBy = "weights") -> Flat:
    """``params`` as a `Flat` (one buffer per group). ``flat.unflatten()`` gives them back."""
    return Layout.of(params, group_by).flatten(params)


def unflatten_params(params: Any) -> Any:
    """The tree form of ``params`` (a `Flat` is cut back; a tree is returned as is)."""
    return params.unflatten() if isinstance(params, Flat) else params


# ----------------------------------------------------------------------------- masks & segments


def buffer_masks(layout: Layout, mask: Any) -> list[Any]:
    """Per buffer: ``True`` / ``False`` when the mask is uniform over its leaves, else a
    boolean array over the buffer's entries (built from the segment boundaries)."""
    tree = mask(layout.abstract()) if callable(mask) else mask
    out = []
    for g, values in zip(layout.groups, layout.per_leaf(tree), strict=True):
        values = [bool(v) for v in values]
        if all(values):
            out.append(True)
        elif not any(values):
            out.append(False)
        else:
            out.append(segment_values(g, jnp.asarray(values)))
    return out


def segment_values(group: Group, values: jax.Array) -> jax.Array:
    """Broadcast one value per leaf of ``group`` to every entry of its buffer:
    ``out[i] = values[leaf containing i]`` (a comparison against the static segment starts)."""
    starts = group.starts
    iota = jax.lax.iota(jnp.int32 if group.size < 2**31 else jnp.int64, group.size)
    method = "compare_all" if len(starts) <= 64 else "scan"
    seg = jnp.searchsorted(jnp.asarray(starts[1:]), iota, side="right", method=method)
    return jnp.asarray(values)[seg]


def segment_sums(group: Group, x: jax.Array) -> jax.Array:
    """Per-leaf sums of a buffer of ``group`` (one value per leaf)."""
    if len(group.leaves) == 1:
        return jnp.sum(x)[None]
    return jnp.stack([jnp.sum(part) for part in jax.lax.split(x, group.sizes)])


# ----------------------------------------------------------------------------- rules on buffers


def on_flat(
    tree_tx: optax.GradientTransformation, flat_tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``tree_tx`` on parameter trees and ``flat_tx`` on `Flat` buffers: how a transform
    whose rule depends on the leaves (a mask, a per-leaf norm) keeps its buffer form in
    this module, out of generic code."""

    def init_fn(params):
        return (flat_tx if isinstance(params, Flat) else tree_tx).init(params)

    def update_fn(updates, state, params=None):
        return (flat_tx if isinstance(updates, Flat) else tree_tx).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


class FlatMaskedState(NamedTuple):
    inner_state: Any


def masked_buffers(inner: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """`optax.masked` on `Flat` buffers: ``mask`` (a tree of bools or a function of the
    parameter tree) is evaluated on the tree the buffers describe and selected per buffer
    (nothing when a buffer is uniformly in or out, one ``where`` otherwise); ``inner``
    keeps state for every entry."""

    def update_fn(updates, state, params=None):
        new, inner_state = inner.update(updates, state.inner_state, params)
        out = []
        for m, n, o in zip(
            buffer_masks(updates.layout, mask), new.buffers, updates.buffers, strict=True
        ):
            out.append(n if m is True else o if m is False else jnp.where(m, n, o))
        return Flat(out, updates.layout), FlatMaskedState(inner_state)

    return optax.GradientTransformation(lambda p: FlatMaskedState(inner.init(p)), update_fn)


def squares(g: jax.Array) -> jax.Array:
    """``g ** 2``, in float32 for a bfloat16 ``g`` (its norms would lose their digits)."""
    return jnp.square(g.astype(jnp.float32 if g.dtype == jnp.bfloat16 else g.dtype))


def per_leaf_buffers(
    scale: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformation:
    """A per-leaf rescaling ``g_l <- g_l * scale(||g_l||)`` on `Flat` buffers: the leaves'
    norms from their segments' sums of squares (float32 for bfloat16 gradients)."""

    def rescale(group, g):
        factor = scale(jnp.sqrt(segment_sums(group, squares(g)))).astype(g.dtype)
        return (g * segment_values(group, factor)).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        groups = updates.layout.groups
        buffers = [rescale(gr, g) for gr, g in zip(groups, updates.buffers, strict=True)]
        return Flat(buffers, updates.layout), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def refuse_buffers(params: Any, why: str, param: str) -> None:
    """Raise `ConfigError` (``why``, naming ``param``) when ``params`` are `Flat` buffers:
    for what needs the parameter tree itself."""
    if isinstance(params, Flat):
        raise ConfigError(why, param=param)


# ----------------------------------------------------------------------------- the wrapper


class FusedState(struct.PyTreeNode):
    """State of `fused`: the wrapped chain's state over the flat buffers. ``group_by`` is
    static, so the train step can flatten parameters exactly as ``init`` did."""

    inner: Any
    group_by: Any = struct.field(pytree_node=False, default="weights")


def _refuse_tree_masks(state: Any) -> None:
    bad = (optax.MaskedState, optax.transforms.PartitionState)
    found = [
        type(s).__name__
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, bad))
        if isinstance(s, bad)
    ]
    if found:
        raise ConfigError(
            f"fused(tx): tx contains optax.masked / optax.multi_transform ({found[0]}), whose mask "
            "would be evaluated on the flat buffers instead of the parameter tree; use the mask= "
            "argument of jtricks transforms or jtricks.optim.masked, which work on both",
            param="tx",
        )


def fused(tx: optax.GradientTransformation, *, group_by: GroupBy = "weights"):
    """Run the element-wise chain ``tx`` over one contiguous buffer per group of leaves.

    The update is ``tx``'s, entry for entry: ``fused(tx).update(g, s, p)`` equals
    ``tx.update(g, s', p)`` up to float summation order in global norms (exact for purely
    element-wise chains). Its cost no longer grows with the number of leaves when the
    parameters and gradients are `Flat` (the jtricks train step makes them so); with
    trees it flattens at the boundary (one concatenate in, one split out).

    Args:
      tx: any chain of element-wise transforms, global-norm transforms, jtricks masked
        transforms and `clip_per_leaf_norm` (e.g. `build_optimizer`'s result).
      group_by: ``"weights"`` (default: per dtype, matrices apart from vectors, so the
        default kernels-only weight-decay mask is uniform per buffer), ``"dtype"`` (one
        buffer per dtype), or ``(path, leaf) -> key``.

    Example:
      >>> tx = fused(adamw(1e-3, weight_decay=1e-4))
      >>> flat = flatten_params(params)        # or just pass trees
      >>> state = tx.init(flat)
      >>> updates, state = tx.update(flat_grads, state, flat)
      >>> flat = optax.apply_updates(flat, updates)
    """
    _check_group_by(group_by)
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        flat = params if isinstance(params, Flat) else flatten_params(params, group_by=group_by)
        state = tx.init(flat)
        _refuse_tree_masks(state)
        return FusedState(inner=state, group_by=group_by)

    def update_fn(updates, state, params=None, **extra_args):
        if isinstance(updates, Flat):
            layout = updates.layout
            if params is not None:
                params = layout.flatten(params)
            new, inner = tx.update(updates, state.inner, params, **extra_args)
            return new, FusedState(inner=inner, group_by=state.group_by)
        layout = Layout.of(updates, state.group_by)
        flat_params = None if params is None else layout.flatten(params)
        new, inner = tx.update(layout.flatten(updates), state.inner, flat_params, **extra_args)
        return layout.unflatten(new.buffers), FusedState(inner=inner, group_by=state.group_by)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def is_fused(opt_state: Any) -> bool:
    """Whether an optimizer state comes from `fused` (the train step then keeps the
    parameters flat inside its compiled loop)."""
    return isinstance(opt_state, FusedState)
