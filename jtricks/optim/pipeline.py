"""Optimizer pipelines from specs: ``"adam(lr=1e-3) | clip_global_norm(1.0) | l2(1e-4)"``.

A pipeline has exactly one optimizer and any number of transforms. Whatever
the order written, they are assembled as

    gradient transforms (clipping, l2, l1, elastic_net; in written order)
    -> optimizer (its chain ends in the learning-rate scale)
    -> update transforms (weight_decay, l1 with form='proximal'; in written order)
    -> plateau scale (only for reduce-on-plateau)
    wrapped in lookahead when the spec has a ``lookahead(sync_period, alpha)`` stage

so ``adam | clip_global_norm(1.0)`` clips the gradient, as a reader expects.
The learning rate is injected with `optax.inject_hyperparams`, so the
current value sits in the state as ``learning_rate`` (logged every step and
readable with `optax.tree_utils.tree_get`).

The same pipeline as a dict: ``{"name": "adam", "lr": 1e-3}``; as a list:
``["adam(lr=1e-3)", {"name": "l2", "lam": 1e-4}]``.

The optimizer stage may also be any optax or optax.contrib optimizer, or a user's
factory by import path (``"optax.lion(b1=0.95) | clip_global_norm(1.0)"``,
``"contrib.muon"``, ``"mypkg.opt:make"``; see `jtricks.optim.external`), and the whole
spec may be a Python callable ``learning_rate -> GradientTransformation``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jtricks.errors import ConfigError, check_range
from jtricks.imports import call_user
from jtricks.optim import alias, external, transforms
from jtricks.optim import groups as groups_lib
from jtricks.optim.lookahead import lookahead
from jtricks.optim.sweep import Keyed, freeze
from jtricks.spec import call_with_checked_args, parse_spec, split_pipeline, split_top_level

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": alias.sgd,
    "momentum": alias.momentum,
    "adagrad": alias.adagrad,
    "normalized_sgd": alias.normalized_sgd,
    "rmsprop": alias.rmsprop,
    "adam": alias.adam,
    "adamw": alias.adamw,
    "adadelta": alias.adadelta,
}


def _l1_stage(lam: float, *, form: str = "subgradient", mask: Any = None):
    if form == "subgradient":
        return "grad", lambda lr: transforms.l1(lam, mask=mask)
    if form == "proximal":
        check_range("lam", lam, low=0.0)
        return "update", lambda lr: transforms.l1_prox(lam, lr, mask=mask)
    raise ConfigError(f"l1 form must be 'subgradient' or 'proximal'; got {form!r}", param="form")


def _grad(factory):
    def stage(*args, **kwargs):
        factory(*args, **kwargs)  # validate now
        return "grad", lambda lr: factory(*args, **kwargs)

    stage.__signature__ = inspect.signature(factory)
    return stage


def _weight_decay_stage(weight_decay: float, *, mask: Any = None):
    check_range("weight_decay", weight_decay, low=0.0)
    return "update", lambda lr: transforms.decoupled_weight_decay(weight_decay, lr, mask=mask)


def _lookahead_stage(sync_period: int = 5, alpha: float = 0.5):
    lookahead(optax.identity(), sync_period, alpha)  # validate now
    return "wrap", lambda tx: lookahead(tx, sync_period, alpha)


TRANSFORMS: dict[str, Callable[..., tuple[str, Callable]]] = {
    "clip_by_value": _grad(transforms.clip_by_value),
    "clip_global_norm": _grad(transforms.clip_global_norm),
    "clip_global_norm_unit": _grad(transforms.clip_global_norm_unit),
    "clip_per_leaf_norm": _grad(transforms.clip_per_leaf_norm),
    "l2": _grad(transforms.l2),
    "l1": _l1_stage,
    "elastic_net": _grad(transforms.elastic_net),
    "weight_decay": _weight_decay_stage,
    "lookahead": _lookahead_stage,
}


def _stages(spec: Any) -> list[tuple[str, tuple, dict]]:
    if isinstance(spec, str):
        return [
            parse_spec(part, what="optimizer") for part in split_pipeline(spec, what="optimizer")
        ]
    if isinstance(spec, dict):
        if "name" not in spec or not isinstance(spec["name"], str):
            raise ConfigError(
                f"an optimizer dict needs a 'name' key; got {spec!r}", param="optimizer"
            )
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return [(spec["name"], (), kwargs)]
    if isinstance(spec, optax.GradientTransformation):
        raise ConfigError(
            "optimizer is an optax GradientTransformation, already built with its learning "
            "rate; a spec names the optimizer so that the learning rate and schedule are "
            "injected: give a factory (lambda learning_rate: optax.adamw(learning_rate)) or "
            "a string ('optax.adamw(weight_decay=0.01)'), or pass the transform itself to "
            "create_train_state and fit",
            param="optimizer",
        )
    if isinstance(spec, list | tuple) and spec:
        return [stage for part in spec for stage in _stages(part)]
    raise ConfigError(
        f"optimizer must be a spec string, a dict or a list of them; got {spec!r}",
        param="optimizer",
    )


def build_optimizer(
    spec: Any,
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    schedule: Callable[[float], optax.Schedule] | None = None,
    plateau: bool = False,
) -> optax.GradientTransformation:
    """Build an optimizer pipeline from a spec (string, dict or list).

    Args:
      spec: e.g. ``"momentum(gamma=0.9, form='damped') | clip_global_norm(1.0) | l2(1e-4)"``;
        or parameter groups, ``"PATTERN [xSCALE] -> PIPELINE ; ..."`` (see `param_groups`).
      learning_rate: float or schedule; the optimizer stage may override it with ``lr=``.
      schedule: optional ``base_lr -> schedule`` applied to the resulting base learning rate
        (so ``"adam(lr=1e-3)"`` with a cosine schedule decays from 1e-3).
      plateau: append `scale_by_plateau` for a reduce-on-plateau callback.

    Returns:
      An `optax.GradientTransformation` (via `optax.inject_hyperparams`). With a numeric
      learning rate, equal specs give equal optimizers whatever the rate
      (`jtricks.optim.sweep.Keyed`), so a learning-rate sweep compiles its programs once.

    Raises:
      ConfigError: unknown names or arguments (listing the valid ones), no optimizer or more than one.
        Everything is validated here, at construction.
    """
    if isinstance(spec, str) and is_grouped(spec):
        return param_groups(parse_groups(spec), learning_rate, schedule=schedule, plateau=plateau)
    make, name, lr = _pipeline(spec, plateau=plateau)
    lr = _base_rate(learning_rate if lr is None else lr, schedule)
    _call(make, (_probe(lr),), {}, name)  # validate the optimizer's arguments now, not at init
    return _injected(make, lr, ("pipeline", freeze(spec), plateau))


def param_groups(
    groups: Sequence[tuple],
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    schedule: Callable[[float], optax.Schedule] | None = None,
    plateau: bool = False,
) -> optax.GradientTransformation:
    """One optimizer with a rule and a rate multiplier per group of parameters.

    Args:
      groups: ``(pattern, rule)`` or ``(pattern, rule, scale)`` triples, in order; a leaf
        goes to the first group whose pattern takes it (``"matrices"``, ``"vectors"``,
        ``"rest"`` or a path glob, see `jtricks.optim.groups`). ``rule`` is a pipeline
        spec (string, dict, list or a callable ``lr -> GradientTransformation``), run at
        ``scale * learning_rate``; or a ready `optax.GradientTransformation`, whose
        updates are multiplied by ``scale`` (the same for any update linear in its rate).
      learning_rate, schedule, plateau: as for `build_optimizer`; one injected learning
        rate (the base, logged as ``lr``) drives every group.

    Example:
      >>> tx = param_groups([("matrices", "contrib.muon"), ("rest", "adamw", 0.1)], 0.02)
    """
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ConfigError(
            f"groups must be a list of (pattern, rule[, scale]) tuples; got {groups!r}",
            param="optimizer",
        )
    makers = []
    for group in groups:
        if not isinstance(group, tuple | list) or len(group) not in (2, 3):
            raise ConfigError(
                f"a parameter group is (pattern, rule) or (pattern, rule, scale); got {group!r}",
                param="optimizer",
            )
        pattern, rule, scale = (*group, 1.0) if len(group) == 2 else group
        makers.append((pattern, _group_maker(pattern, rule, scale), scale))
    make = groups_lib.grouped_maker(makers)
    lr = _base_rate(learning_rate, schedule)
    _call(make, (_probe(lr),), {}, "parameter groups")
    return _injected(_with_plateau(make, plateau), lr, ("groups", freeze(groups), plateau))


def _group_maker(pattern: str, rule: Any, scale: Any):
    if isinstance(rule, optax.GradientTransformation):
        return lambda lr, rule=rule, scale=scale: optax.chain(rule, optax.scale(scale))
    make, name, lr = _pipeline(rule)
    if lr is not None:
        raise ConfigError(
            f"group {pattern!r}: {name!r} sets lr={lr!r}; inside parameter groups give the "
            "group a rate multiplier instead (e.g. 'rest x0.1 -> adam'), so one learning "
            "rate and schedule drive every group",
            param="optimizer",
        )
    return make


def is_grouped(spec: str) -> bool:
    """Whether a spec string declares parameter groups (``pattern -> pipeline``)."""
    return any("->" in part.split("(", 1)[0] for part in split_top_level(spec, ";"))


def parse_groups(spec: str) -> list[tuple[str, str, float]]:
    """``"matrices -> contrib.muon ; rest x0.1 -> adamw"`` as
    ``[("matrices", "contrib.muon", 1.0), ("rest", "adamw", 0.1)]``."""
    groups = []
    for part in split_top_level(spec, ";"):
        head, arrow, body = part.partition("->")
        words = head.split()
        if not arrow or not body.strip() or len(words) not in (1, 2):
            raise ConfigError(
                f"cannot parse parameter group {part!r} in {spec!r}: expected "
                "'PATTERN -> PIPELINE' or 'PATTERN xSCALE -> PIPELINE', groups joined by ';'",
                param="optimizer",
            )
        scale = 1.0
        if len(words) == 2:
            try:
                if not words[1].startswith("x"):
                    raise ValueError
                scale = float(words[1][1:])
            except ValueError:
                raise ConfigError(
                    f"parameter group {part!r}: the rate multiplier is written xSCALE "
                    f"(e.g. x0.1); got {words[1]!r}",
                    param="optimizer",
                ) from None
        groups.append((words[0], body.strip(), scale))
    return groups


def _probe(lr: Any) -> Any:
    """The value the maker sees inside `optax.inject_hyperparams`: a number, also for a
    schedule (its first value), so a factory may compute with it (``optax.scale(-lr)``)."""
    return lr(0) if callable(lr) else lr


def _injected(make: Callable[[Any], optax.GradientTransformation], lr: Any, key: Any):
    """``make`` with ``learning_rate`` injected into the state. With a numeric rate the
    result is `Keyed` by the spec, so a sweep over rates compiles once
    (`jtricks.optim.sweep`); a schedule keeps its own identity."""
    tx = optax.inject_hyperparams(make)(learning_rate=lr)
    return tx if callable(lr) else Keyed(tx, key)


def _base_rate(lr: Any, schedule: Callable[[float], optax.Schedule] | None) -> Any:
    """The checked base learning rate, with ``schedule`` applied when given."""
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise ConfigError(f"learning rate must be a number; got {lr!r}", param="learning_rate")
    check_range("learning_rate", lr, low=0.0, low_inclusive=False)
    return lr if schedule is None else schedule(float(lr))


def _with_plateau(make, plateau: bool):
    if not plateau:
        return make
    return lambda learning_rate: optax.chain(make(learning_rate), transforms.scale_by_plateau())


def _pipeline(
    spec: Any, *, plateau: bool = False
) -> tuple[Callable[[Any], optax.GradientTransformation], str, Any]:
    """``(make, name, lr)``: the pipeline's maker ``learning_rate -> chain`` (ending in
    `scale_by_plateau` with ``plateau``), its optimizer's name, and the ``lr=`` the spec
    sets (``None`` when it sets none)."""
    if callable(spec) and not isinstance(spec, optax.GradientTransformation):
        stages = [(getattr(spec, "__name__", "callable"), (), {"_factory": spec})]
    else:
        stages = _stages(spec)
    opt, parts = None, {"grad": [], "update": [], "wrap": []}
    for name, args, kwargs in stages:
        if name in OPTIMIZERS or external.is_external(name) or "_factory" in kwargs:
            if opt is not None:
                raise ConfigError(
                    f"a pipeline has exactly one optimizer; got {opt[0]!r} and {name!r}",
                    param="optimizer",
                )
            if "lr" in kwargs:
                kwargs["learning_rate"] = kwargs.pop("lr")
            opt = (name, args, kwargs)
        elif name in TRANSFORMS:
            kind, make = _call(TRANSFORMS[name], args, kwargs, name)
            parts[kind].append(make)
        else:
            raise ConfigError(
                f"unknown optimizer or transform {name!r}{external.prefixed_hint(name)}; "
                f"valid optimizers are: {', '.join(sorted(OPTIMIZERS))}"
                f" (or optax.<name>, contrib.<name>, module:factory); "
                f"valid transforms are: {', '.join(sorted(TRANSFORMS))}"
                + external._close(name, [*OPTIMIZERS, *TRANSFORMS]),
                param="optimizer",
            )
    if opt is None:
        raise ConfigError(
            f"the pipeline has no optimizer; add one of: {', '.join(sorted(OPTIMIZERS))}",
            param="optimizer",
        )
    name, args, kwargs = opt
    lr = kwargs.pop("learning_rate", None)
    factory = kwargs.pop("_factory", None) or OPTIMIZERS.get(name) or external.resolve(name)

    def make(learning_rate):
        opt_tx = _optimizer(factory, name, learning_rate, args, kwargs)
        chain = (
            [m(learning_rate) for m in parts["grad"]]
            + [opt_tx]
            + [m(learning_rate) for m in parts["update"]]
            + ([transforms.scale_by_plateau()] if plateau else [])
        )
        tx = optax.chain(*chain)
        for wrap in parts["wrap"]:
            tx = wrap(tx)
        return tx

    return make, name, lr


def _optimizer(factory, name: str, learning_rate, args: tuple, kwargs: dict):
    """The optimizer stage's transformation: jtricks' own factories take the learning rate
    first; an outside one as ``learning_rate=`` unless that is its first parameter (or it
    has none, e.g. `optax.polyak_sgd`'s ``max_learning_rate``)."""
    if factory in OPTIMIZERS.values():
        return call_with_checked_args(
            factory, (learning_rate, *args), kwargs, what=f"optimizer {name!r}"
        )
    first = next(iter(inspect.signature(factory).parameters), None)
    if first != "learning_rate" and external.takes_learning_rate_keyword(factory):
        call_args, call_kwargs = args, {"learning_rate": learning_rate, **kwargs}
    else:
        call_args, call_kwargs = (learning_rate, *args), kwargs
    tx = call_user(factory, call_args, call_kwargs, what="optimizer", name=name)
    return external.check_transformation(tx, name)


def _call(fn, args, kwargs, name):
    try:
        return call_with_checked_args(fn, args, kwargs, what=f"optimizer stage {name!r}")
    except ConfigError as e:
        if e.param == "optimizer":
            raise
        raise ConfigError(f"in optimizer stage {name!r}: {e}", param="optimizer") from None


def current_learning_rate(opt_state: Any) -> Any:
    """The effective learning rate held in an optimizer state, or ``None`` if it has none.

    Reads the ``learning_rate`` injected by `build_optimizer` (any
    `optax.inject_hyperparams` state) and multiplies by the reduce-on-plateau
    ``plateau_scale`` when present. Works inside jit.
    """
    injected = [
        s.hyperparams["learning_rate"]
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
        if hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
    ]
    if not injected:
        return None
    scale = optax.tree_utils.tree_get(opt_state, "plateau_scale", 1.0)
    return injected[0] * scale


def set_learning_rate(opt_state: Any, learning_rate: Any) -> Any:
    """``opt_state`` with every injected ``learning_rate`` (`optax.inject_hyperparams`)
    replaced by ``learning_rate``; works inside jit and vmap (how K rates share one program)."""

    def replace(node):
        if hasattr(node, "hyperparams") and "learning_rate" in node.hyperparams:
            return node._replace(hyperparams={**node.hyperparams, "learning_rate": learning_rate})
        return node

    return jax.tree.map(replace, opt_state, is_leaf=lambda n: hasattr(n, "hyperparams"))
