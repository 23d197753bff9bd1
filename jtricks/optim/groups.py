"""Parameter groups: a different update rule and learning-rate multiplier per part of a model.

A group is a *pattern* and a rule. Every parameter leaf goes to the first group whose
pattern matches it:

* ``"matrices"``: leaves with two or more dimensions (dense and conv kernels, embeddings);
* ``"vectors"``: leaves with fewer (biases, normalisation scales and offsets);
* ``"rest"``: every leaf no earlier group took (only as the last group);
* anything else: a glob (`fnmatch`, case-sensitive) over the leaf's path written
  ``"Dense_0/kernel"`` (`jax.tree_util.keystr` with ``simple=True, separator="/"``);
  ``*`` also matches ``/``, so ``"backbone/*"`` takes a whole submodule.

A leaf that no group takes, and a group that takes no leaf (a misspelt pattern), are
errors when the optimizer is initialised, naming the leaf or the pattern.

Built on `optax.multi_transform` (which does the per-group routing exactly); new here
are the rank and glob patterns, the first-match rule with its checks, and
`grouped_maker`, which turns per-group pipeline makers and multipliers into one maker
of the learning rate, so that a single injected, logged and scheduled learning rate
drives every group (group ``g`` runs at ``scale_g * lr_t``).

Example (Muon on the matrices, AdamW on the rest, as Jordan et al. train; a lower rate
for a pretrained backbone)::

    build_optimizer("matrices -> contrib.muon ; rest -> adamw(weight_decay=0.01)", 0.02)
    build_optimizer("backbone/* x0.1 -> adam ; rest -> adam", 1e-3)

References:
  Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
  https://kellerjordan.github.io/posts/muon/
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jtricks.errors import ConfigError
from jtricks.optim.fused import refuse_buffers
from jtricks.trees import leaf_path

RANK_PATTERNS: dict[str, Callable[[Any], bool]] = {
    "matrices": lambda leaf: getattr(leaf, "ndim", 0) >= 2,
    "vectors": lambda leaf: getattr(leaf, "ndim", 0) < 2,
}
REST = "rest"

Maker = Callable[[Any], optax.GradientTransformation]
"""``learning_rate -> GradientTransformation``: one group's pipeline."""


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """The patterns, checked: non-empty strings, no repeats, ``"rest"`` only last."""
    patterns = list(patterns)
    if not patterns:
        raise ConfigError("parameter groups need at least one group", param="optimizer")
    for i, p in enumerate(patterns):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(
                f"a parameter group's pattern must be a non-empty string; got {p!r}",
                param="optimizer",
            )
        if p == REST and i != len(patterns) - 1:
            raise ConfigError(
                f"the group 'rest' takes every leaf no earlier group took, so it must be last; "
                f"got the groups {patterns}",
                param="optimizer",
            )
    repeated = sorted({p for p in patterns if patterns.count(p) > 1})
    if repeated:
        raise ConfigError(f"parameter group patterns repeat: {repeated}", param="optimizer")
    return patterns


def matches(pattern: str, path: str, leaf: Any) -> bool:
    """Whether ``pattern`` (see the module docstring) takes the leaf at ``path``."""
    if pattern == REST:
        return True
    if pattern in RANK_PATTERNS:
        return RANK_PATTERNS[pattern](leaf)
    return fnmatch.fnmatchcase(path, pattern)


def assign(params: Any, patterns: Sequence[str]) -> Any:
    """A tree like ``params`` whose leaves are group labels ``"0"``, ``"1"``, ... (the index
    of the first matching pattern), for `optax.multi_transform`.

    Raises:
      ConfigError: a leaf that no pattern matches, or (when no leaf is masked out by an
        enclosing `optax.masked`) a pattern that matches no leaf.
    """
    refuse_buffers(
        params,
        "parameter groups route leaves of the parameter tree, and fused(tx) (--fused) "
        "keeps the parameters as flat buffers: parameter groups cannot be fused; drop "
        "fused, or use the mask= argument of jtricks transforms, which works on both",
        param="optimizer",
    )
    used: set[int] = set()
    masked = False

    def label(path, leaf):
        nonlocal masked
        if isinstance(leaf, optax.MaskedNode):
            masked = True
            return leaf
        name = leaf_path(path)
        for i, pattern in enumerate(patterns):
            if matches(pattern, name, leaf):
                used.add(i)
                return str(i)
        raise ConfigError(
            f"parameter {name!r} (shape {tuple(getattr(leaf, 'shape', ()))}) is in no "
            f"parameter group; the groups are {list(patterns)} (end with 'rest' to take the "
            "remaining leaves)",
            param="optimizer",
        )

    labels = jax.tree_util.tree_map_with_path(
        label, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    unused = [p for i, p in enumerate(patterns) if i not in used]
    if unused and not masked:
        raise ConfigError(
            f"parameter group {unused[0]!r} matches no parameter; paths look like "
            f"{_example_paths(params)}",
            param="optimizer",
        )
    return labels


def _example_paths(params: Any, k: int = 4) -> list[str]:
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return paths[:k] + (["..."] if len(paths) > k else [])


def grouped_maker(groups: Sequence[tuple[str, Maker, float]]) -> Maker:
    """One maker ``lr -> multi_transform`` from ``(pattern, maker, scale)`` triples: group
    ``i`` runs ``maker_i(scale_i * lr)`` on the leaves `assign` gives it."""
    patterns = check_patterns([g[0] for g in groups])
    for pattern, _, scale in groups:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise ConfigError(
                f"the rate multiplier of group {pattern!r} must be a number > 0; got {scale!r}",
                param="optimizer",
            )

    def make(learning_rate: Any) -> optax.GradientTransformation:
        txs = {str(i): m(_scaled(learning_rate, s)) for i, (_, m, s) in enumerate(groups)}
        return optax.multi_transform(txs, lambda params: assign(params, patterns))

    return make


def _scaled(learning_rate: Any, scale: float) -> Any:
    if callable(learning_rate):  # a schedule (when a pipeline is validated at construction)
        return lambda count: scale * learning_rate(count)
    return learning_rate * scale
