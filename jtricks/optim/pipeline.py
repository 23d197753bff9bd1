"""Optimizer pipelines from specs: ``"adam(lr=1e-3) | clip_global_norm(1.0) | l2(1e-4)"``.

A pipeline has exactly one optimizer and any number of transforms. Whatever
the order written, they are assembled as

    gradient transforms (clipping, l2, l1, elastic_net; in written order)
    -> optimizer (its chain ends in the learning-rate scale)
    -> update transforms (weight_decay, l1 with form='proximal'; in written order)
    -> plateau scale (only for reduce-on-plateau)

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
from collections.abc import Callable
from typing import Any

import jax
import optax

from jtricks.errors import ConfigError, check_range
from jtricks.optim import alias, external, transforms
from jtricks.spec import call_with_checked_args, parse_spec, split_pipeline

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


TRANSFORMS: dict[str, Callable[..., tuple[str, Callable]]] = {
    "clip_by_value": _grad(transforms.clip_by_value),
    "clip_global_norm": _grad(transforms.clip_global_norm),
    "clip_global_norm_unit": _grad(transforms.clip_global_norm_unit),
    "clip_per_leaf_norm": _grad(transforms.clip_per_leaf_norm),
    "l2": _grad(transforms.l2),
    "l1": _l1_stage,
    "elastic_net": _grad(transforms.elastic_net),
    "weight_decay": _weight_decay_stage,
}


def _stages(spec: Any) -> list[tuple[str, tuple, dict]]:
    if isinstance(spec, str):
        return [parse_spec(part, what="optimizer") for part in split_pipeline(spec)]
    if isinstance(spec, dict):
        if "name" not in spec or not isinstance(spec["name"], str):
            raise ConfigError(
                f"an optimizer dict needs a 'name' key; got {spec!r}", param="optimizer"
            )
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return [(spec["name"], (), kwargs)]
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
      spec: e.g. ``"momentum(gamma=0.9, form='damped') | clip_global_norm(1.0) | l2(1e-4)"``.
      learning_rate: float or schedule; the optimizer stage may override it with ``lr=``.
      schedule: optional ``base_lr -> schedule`` applied to the resulting base learning rate
        (so ``"adam(lr=1e-3)"`` with a cosine schedule decays from 1e-3).
      plateau: append `scale_by_plateau` for a reduce-on-plateau callback.

    Returns:
      An `optax.GradientTransformation` (via `optax.inject_hyperparams`).

    Raises:
      ConfigError: unknown names or arguments (listing the valid ones), no optimizer or more than one.
        Everything is validated here, at construction.
    """
    if callable(spec) and not isinstance(spec, optax.GradientTransformation):
        stages = [(getattr(spec, "__name__", "callable"), (), {"_factory": spec})]
    else:
        stages = _stages(spec)
    opt, grad_parts, update_parts = None, [], []
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
            (grad_parts if kind == "grad" else update_parts).append(make)
        else:
            raise ConfigError(
                f"unknown optimizer or transform {name!r}; valid optimizers are: {', '.join(sorted(OPTIMIZERS))}"
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
    lr = kwargs.pop("learning_rate", learning_rate)
    if not callable(lr):
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            raise ConfigError(f"learning rate must be a number; got {lr!r}", param="learning_rate")
        check_range("learning_rate", lr, low=0.0, low_inclusive=False)
        if schedule is not None:
            lr = schedule(float(lr))

    factory = kwargs.pop("_factory", None) or OPTIMIZERS.get(name) or external.resolve(name)

    def make(learning_rate):
        opt_tx = _optimizer(factory, name, learning_rate, args, kwargs)
        parts = (
            [m(learning_rate) for m in grad_parts]
            + [opt_tx]
            + [m(learning_rate) for m in update_parts]
        )
        if plateau:
            parts.append(transforms.scale_by_plateau())
        return optax.chain(*parts)

    _call(make, (lr,), {}, name)  # validate the optimizer's own arguments now, not at init
    return optax.inject_hyperparams(make)(learning_rate=lr)


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
    try:
        tx = call_with_checked_args(factory, call_args, call_kwargs, what=f"optimizer {name!r}")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the factory's own validation
        raise ConfigError(f"optimizer {name!r}: {e}", param="optimizer") from None
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
