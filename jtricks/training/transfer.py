"""Transfer learning by freezing: load pretrained parameters, train only some layers.

* `freeze(tx, frozen)`: parameters whose path matches a pattern get no update, through
  optax's partitioning (`optax.multi_transform` with `optax.set_to_zero` for the frozen
  part), so the optimizer keeps no state for them and they stay bit-identical.
* `finetune_labels(preset, layers)`: the three transfer regimes as presets over the
  layers in forward order: ``"head"`` (only the last layer trains), ``"last:K"``
  (the last K layers), ``"all"`` (everything, starting from the pretrained weights).
* `load_pretrained(state, source)`: copy every parameter and BatchNorm statistic whose
  path and shape match from a jtricks checkpoint (or run folder) into ``state``; a new
  head of another shape keeps its fresh initialisation.

Paths are ``"layer/leaf"`` strings such as ``"Conv_0/kernel"`` or
``"stage1_block1/Conv1D_0/kernel"``; patterns are `fnmatch` globs (``"Conv_*"``).
BatchNorm statistics are not parameters, so `freeze` leaves them alone: in training mode
a frozen layer's BatchNorm still updates its running averages (PyTorch's default).
* `freeze_batch_stats(state, frozen)`: keep them too, as Keras does for a frozen layer
  (the forward pass still normalises by the batch's statistics in training mode).

References:
  Yosinski et al., "How transferable are features in deep neural networks?" (2014),
  https://arxiv.org/abs/1411.1792
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

from jtricks.errors import ConfigError
from jtricks.training.model import NNXApply, apply_model
from jtricks.training.state import TrainState, average_start, is_ensemble, stats_average_start
from jtricks.trees import named_leaves, path_names, rng_streams


def param_paths(params: Any) -> list[str]:
    """Every parameter leaf's ``"layer/leaf"`` path."""
    return ["/".join(p) for p in named_leaves(params)]


def forward_layers(state: TrainState, x: Any) -> list[str]:
    """Layers that own parameters, in the order the forward pass first calls them.

    (Parameter dicts come back from jax transforms with sorted keys, which is not the
    order of the layers: ``"stage1..."`` sorts before ``"stem"``.) Traced abstractly,
    nothing is computed: a Linen model with `flax.linen.intercept_methods`; an NNX
    model, which has no method interception, by the order in which the traced forward
    pass first reads each layer's parameters (`first_reads`).
    """
    first = jax.tree.map(lambda a: jnp.asarray(a)[:1], x)  # an array or any pytree
    owners = {p.rsplit("/", 1)[0] for p in param_paths(state.params)}
    if isinstance(state.apply_fn, NNXApply):
        order = [p.rsplit("/", 1)[0] for p in first_reads(state, first)]
    else:
        order = _called_layers(state, first)
    ranked = list(dict.fromkeys(name for name in order if name in owners))
    return ranked + sorted(owners - set(ranked))


def _called_layers(state: TrainState, first: Any) -> list[str]:
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            order.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, xb: state.apply_fn(v, xb, train=False), variables, first)
    return order


def first_reads(state: TrainState, x: Any) -> list[str]:
    """Parameter paths in the order the forward pass on ``x`` first reads them: the
    equations of its jaxpr (`jax.make_jaxpr`) in order, descending into nested ones (a
    jit, remat, scan or cond body) and following each parameter into them. A parameter
    the pass never reads is not listed."""

    def forward(params):
        return apply_model(state, params, x, train=False, key=None)[0]

    closed = jax.make_jaxpr(forward)(state.params)
    names = dict(zip(closed.jaxpr.invars, param_paths(state.params), strict=True))
    order: list[str] = []
    _read_order(closed.jaxpr, names, order)
    return order


def _read_order(jaxpr: Any, names: dict, order: list[str]) -> None:
    for eqn in jaxpr.eqns:
        named = [names.get(v) if isinstance(v, jex_core.Var) else None for v in eqn.invars]
        for sub in jex_core.jaxprs_in_params(eqn.params):
            skip = len(eqn.invars) - len(sub.invars)  # a cond's index, a while's none
            if skip >= 0:  # the body's inputs are the equation's last ones, in order
                inner = {v: n for v, n in zip(sub.invars, named[skip:], strict=True) if n}
                _read_order(sub, inner, order)
        order.extend(n for n in named if n is not None and n not in order)


def finetune_labels(preset: str, layers: Sequence[str]) -> dict[str, bool]:
    """Which layers train under a transfer preset: ``{layer: trainable}``.

    ``"head"``: the last layer only; ``"last:K"``: the last K layers; ``"all"``: every layer.

    Raises:
      ConfigError: an unknown preset, or K outside ``1..len(layers)``.
    """
    n = len(layers)
    if preset == "all":
        k = n
    elif preset == "head":
        k = 1
    elif isinstance(preset, str) and preset.startswith("last:"):
        try:
            k = int(preset.split(":", 1)[1])
        except ValueError:
            k = -1
        if not 1 <= k <= n:
            raise ConfigError(
                f"finetune 'last:K' needs 1 <= K <= {n} (the model's layers); got {preset!r}",
                param="finetune",
            )
    else:
        raise ConfigError(
            f"unknown finetune preset {preset!r}; valid presets are: head, last:K, all",
            param="finetune",
        )
    return {layer: i >= n - k for i, layer in enumerate(layers)}


def freeze(
    tx: optax.GradientTransformation,
    frozen: Sequence[str] = (),
    *,
    trainable: Sequence[str] | None = None,
) -> optax.GradientTransformation:
    """``tx`` on the trainable parameters, zero updates on the frozen ones.

    Give glob patterns over ``"layer/leaf"`` paths: ``frozen`` (those matching are frozen)
    or ``trainable`` (all others are frozen). Built on `optax.multi_transform`, so it
    chains with any optax transformation.
    """
    frozen, trainable = list(frozen), None if trainable is None else list(trainable)

    def is_frozen(path: str) -> bool:
        if trainable is not None:
            return not any(fnmatch.fnmatchcase(path, p) for p in trainable)
        return any(fnmatch.fnmatchcase(path, p) for p in frozen)

    def labels(params):  # any tree: a Linen dict, an NNX state
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if is_frozen("/".join(path_names(path))) else "train", params
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def freeze_batch_stats(
    state: TrainState, frozen: Sequence[str] = ("*",), *, trainable: Sequence[str] | None = None
) -> TrainState:
    """``state`` whose train step keeps the BatchNorm running statistics (any leaf of
    ``batch_stats``) whose path matches a pattern: ``frozen`` (those matching are kept), or
    ``trainable`` (all others are kept, e.g. the same patterns as `freeze`'s). New here:
    optax transformations only see gradients, so this is a static field of the state
    (`TrainState.frozen_stats`) the step reads.

    Raises:
      ConfigError: a ``frozen`` pattern that matches no statistic, or a state without any.

    Example:
      >>> state = freeze_batch_stats(state, ["backbone/*"])
    """
    from jtricks.training.state import stat_paths

    paths = stat_paths(state.batch_stats)
    if not paths:
        raise ConfigError("the model keeps no batch statistics to freeze", param="frozen")
    if trainable is not None:  # trainable layers need not keep statistics (a head has none)
        kept = [p for p in paths if not any(fnmatch.fnmatchcase(p, t) for t in trainable)]
        return state.replace(frozen_stats=tuple(kept))
    for pattern in frozen:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            raise ConfigError(
                f"frozen pattern {pattern!r} matches no batch statistic; they are: "
                f"{', '.join(paths[:8])}{' ...' if len(paths) > 8 else ''}",
                param="frozen",
            )
    return state.replace(frozen_stats=tuple(frozen))


def preset_patterns(preset: str, layers: Sequence[str]) -> list[str]:
    """Trainable-path patterns for `freeze(trainable=...)` from a `finetune_labels` preset."""
    return [f"{layer}/*" for layer, on in finetune_labels(preset, layers).items() if on]


def _checkpoint_dir(source: str | os.PathLike) -> Path:
    from jtricks.training.checkpoint import best_checkpoint, list_checkpoints

    path = Path(source)
    if (path / "state").is_dir():
        return path
    for folder in (path / "checkpoints", path):
        best = best_checkpoint(folder)
        found = [best] if best is not None else list_checkpoints(folder)
        if found:
            return found[-1]
    raise ConfigError(
        f"no jtricks checkpoint at {str(path)!r} (expected a checkpoint folder with state/, "
        "or a run folder with checkpoints/)",
        param="pretrained",
    )


def load_pretrained(
    state: TrainState, source: str | os.PathLike
) -> tuple[TrainState, dict[str, list[str]]]:
    """Copy parameters and BatchNorm statistics from a checkpoint into ``state``, layer by
    layer: a layer loads when the checkpoint holds every one of its leaves at the same path
    and shape, else it keeps its initialisation whole (a first layer of another input width
    does not take the saved bias beside its random kernel).

    ``source`` is a checkpoint folder, or a run folder (its ``best`` checkpoint, else the
    newest). The checkpoint's integrity is verified first. The ``batch_stats`` of matched
    layers come with their parameters, so a same-architecture reload evaluates exactly as
    the saved model does (a BatchNorm network with fresh statistics, mean 0 and variance 1,
    does not). The optimizer state is re-initialised for the new parameters, and an EMA
    (``ema_params``, ``ema_batch_stats``) starts from them. Stacked states (an ensemble, a
    search's trials: `is_ensemble`) load the one checkpoint into every member; the
    members keep their own fresh layers (a new head). An ensemble's checkpoint loads
    member by member into as many members.

    Returns:
      The new state and ``{"loaded": [...], "kept": [...], "stats_loaded": [...],
      "stats_kept": [...]}``: parameter and statistic paths loaded, and those kept at their
      fresh initialisation (absent from the checkpoint or of another shape, e.g. a new
      head). `describe_loaded` says it in one line.

    Raises:
      ConfigError: no checkpoint there, a damaged one, or no parameter in common.
    """
    import orbax.checkpoint as ocp

    from jtricks.training.checkpoint import verify

    path = _checkpoint_dir(source).absolute()
    verify(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        saved = ckptr.restore(path / "state")
    except Exception as e:
        raise ConfigError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}", param="pretrained"
        ) from None
    finally:
        ckptr.close()
    broadcast = _broadcast(state, saved, path)
    params, loaded, kept = _matching(saved["params"], state.params, broadcast)
    if not loaded:
        raise ConfigError(
            f"checkpoint {path} shares no parameter (same path and shape) with this model",
            param="pretrained",
        )
    saved_stats = saved.get("batch_stats") or {}
    stats, stats_loaded, stats_kept = _matching(saved_stats, state.batch_stats, broadcast)
    init = jax.vmap(state.tx.init) if is_ensemble(state) else state.tx.init
    state = state.replace(params=params, opt_state=init(params), batch_stats=stats)
    if state.ema_params is not None:  # the average starts from the initial parameters
        state = state.replace(
            ema_params=average_start(params, state.ema_debias),
            ema_batch_stats=stats_average_start(stats, state.ema_debias),
        )
    return state, {
        "loaded": loaded,
        "kept": kept,
        "stats_loaded": stats_loaded,
        "stats_kept": stats_kept,
    }


def _broadcast(state: TrainState, saved: Any, path: Path) -> bool:
    """Whether ``saved`` (one model) goes to every member of stacked ``state``; an
    ensemble's checkpoint loads member by member into as many members, else it is refused.
    """
    members = np.shape(saved.get("step", 0))
    if not members:
        return is_ensemble(state)
    have = tuple(np.shape(state.step))
    if have != members:
        into = f"an ensemble of {have[0]}" if have else "a single model"
        raise ConfigError(
            f"checkpoint {path} holds an ensemble of {members[0]} members; it loads into "
            f"--ensemble {members[0]} (member by member), not into {into}",
            param="pretrained",
        )
    return False


def _matching(saved: Any, target: Any, stacked: bool = False) -> tuple[Any, list[str], list[str]]:
    """``target`` (a Linen dict or an NNX state) with every layer whose leaves ``saved``
    all holds at the same paths and shapes replaced by the saved ones (in the target's
    dtype); the leaf paths loaded and kept. A layer loads whole or not at all: a first
    layer with another input width keeps its fresh bias with its fresh kernel. An RNG
    stream's variables (an NNX module's PRNG key and the count beside it) stay fresh and
    are neither. ``stacked``: the target's leaves have a leading member axis, and a saved
    leaf goes to every member."""
    if not target:
        return target, [], []
    saved_flat = _saved_names(saved)
    streams = rng_streams(target)
    leaves = {n: v for n, v in named_leaves(target).items() if n[:-1] not in streams}

    def fits(names: tuple[str, ...], v: Any) -> bool:
        src = saved_flat.get("/".join(names))
        return src is not None and np.shape(src) == (v.shape[1:] if stacked else v.shape)

    whole = {n[:-1] for n, v in leaves.items() if not fits(n, v)}
    loaded = ["/".join(n) for n in leaves if n[:-1] not in whole]
    kept = ["/".join(n) for n in leaves if n[:-1] in whole]
    take = set(loaded)

    def pick(path, v):
        name = "/".join(path_names(path))
        if name not in take:
            return v
        return jnp.broadcast_to(jnp.asarray(saved_flat[name], v.dtype), v.shape)

    return jax.tree_util.tree_map_with_path(pick, target), loaded, kept


def _saved_names(saved: Any) -> dict[str, Any]:
    """A restored checkpoint tree's leaves by ``"layer/leaf"`` path; an NNX state's dump
    (every path ending in its variables' ``value``) without that last part."""
    flat = {"/".join(k): v for k, v in named_leaves(saved).items()}
    if flat and all(k.endswith("/value") for k in flat):
        return {k.removesuffix("/value"): v for k, v in flat.items()}
    return flat


def layer_names(paths: Sequence[str]) -> list[str]:
    """The layers of ``"layer/leaf"`` paths (each path less its leaf), in order, once each."""
    return list(dict.fromkeys(p.rsplit("/", 1)[0] for p in paths))


def describe_loaded(info: dict[str, list[str]]) -> str:
    """One line for `load_pretrained`'s report: which layers' parameters and BatchNorm
    statistics were loaded, which layers are new (kept at their initialisation)."""

    layers = layer_names

    def show(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    loaded, new = layers(info["loaded"]), layers(info["kept"])
    line = f"pretrained: parameters of {len(loaded)} layer(s) loaded ({show(loaded)})"
    if info.get("stats_loaded") or info.get("stats_kept"):
        stats = layers(info["stats_loaded"])
        line += f", batch_stats of {len(stats)}" + (f" ({show(stats)})" if stats else "")
    new += [s for s in layers(info.get("stats_kept", [])) if s not in new]
    return line + (f"; new: {show(new)}" if new else "; no new layer")
