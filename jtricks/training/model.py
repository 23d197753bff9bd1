"""Calling a user's model: the train flag where its signature takes one, BatchNorm statistics.

`create_train_state` stores one of two adapters as ``state.apply_fn``, both called as
``apply_fn(variables, inputs, *, train, rngs=None, mutable=False)`` (Linen's ``apply``):

* `LinenApply` for a Linen module, whatever its own flag is called (``train``,
  ``training``, ``is_training``, or ``deterministic``, passed negated) or if it has none;
* `NNXApply` for a Flax NNX module: its parameters (``nnx.Param``) are ``variables
  ["params"]`` and everything else it holds (BatchNorm statistics, its RNG streams, other
  variables) ``variables["batch_stats"]``; training and evaluation mode are the two
  graph definitions of ``model.train()`` and ``model.eval()``.

Both are frozen dataclasses, so two states of equal models share compiled programs.
`apply_model` runs either inside a step. New here: Flax's ``nnx.bridge`` wraps NNX modules
for Linen code but needs the caller to thread its RNG streams; `NNXApply` keeps the
module's own streams in the state, so a step is what a hand-written ``nnx`` loop does.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jtricks.errors import ConfigError
from jtricks.optim.fused import unflatten_params
from jtricks.trees import named_leaves

TRAIN_ARGS = ("train", "training", "is_training", "deterministic")
AUTO = "auto"


def detect_train_arg(module: nn.Module) -> str | None:
    """The keyword of ``module.__call__`` that switches training mode, or ``None``; for an
    NNX module wrapped by ``nnx.bridge.to_linen`` (whose own ``__call__`` passes every
    keyword through), the keyword of the NNX class's ``__call__``."""
    nnx_class = getattr(module, "nnx_class", None)
    target = nnx_class if isinstance(nnx_class, type) else type(module)
    try:
        params = inspect.signature(target.__call__).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in TRAIN_ARGS if name in params), None)


MAX_STREAMS = 16  # RNG streams `LinenApply.init` adds before it gives up


@dataclasses.dataclass(frozen=True)
class LinenApply:
    """``module.apply`` with the training flag passed as the module expects it.

    Attributes:
      module: the Linen module.
      train_arg: the keyword to pass (``deterministic`` gets ``not train``), or ``None``
        for a module without one.
    """

    module: nn.Module
    train_arg: str | None

    def _flag(self, train: bool | None) -> dict[str, bool]:
        if self.train_arg is None or train is None:
            return {}
        return {self.train_arg: (not train) if self.train_arg == "deterministic" else train}

    def __call__(
        self, variables, inputs, *, train: bool | None = None, rngs=None, mutable=False, **kwargs
    ):
        """``module.apply``; ``train=None`` leaves the module's own default, other keywords
        (e.g. ``capture_intermediates``) go to ``module.apply``."""
        return self.module.apply(
            variables, inputs, rngs=rngs, mutable=mutable, **self._flag(train), **kwargs
        )

    def init(self, key: jax.Array, inputs: Any) -> dict[str, Any]:
        """The module's variables, initialised in evaluation mode from ``key``.

        Linen falls back to the ``params`` stream for any other; an NNX module wrapped by
        ``nnx.bridge.to_linen`` does not, and its ``nnx.Dropout(rngs=...)`` asks for a
        ``dropout`` stream at construction. Every stream it names is given, drawn from
        ``key`` (``fold_in(key, i)`` for the i-th); ``params`` stays ``key``."""
        rngs = {"params": key}
        while True:
            try:
                return self.module.init(rngs, inputs, **self._flag(False))
            except KeyError as e:
                missing = re.search(r"No RngStream named '(\w+)'", str(e))
                if missing is None or missing[1] in rngs or len(rngs) > MAX_STREAMS:
                    raise
                rngs[missing[1]] = jax.random.fold_in(key, len(rngs))


def linen_apply(module: nn.Module, train_arg: str | None = AUTO) -> LinenApply:
    """Wrap ``module`` for `TrainState.apply_fn`; ``train_arg="auto"`` reads its signature."""
    if train_arg == AUTO:
        train_arg = detect_train_arg(module)
    elif train_arg is not None and not isinstance(train_arg, str):
        raise ConfigError(
            f"train_arg must be a keyword name, None or 'auto'; got {train_arg!r}",
            param="train_arg",
        )
    return LinenApply(module, train_arg)


@dataclasses.dataclass(frozen=True)
class NNXApply:
    """A Flax NNX module as a pure function of its split state.

    Attributes:
      train_graph: ``nnx.split(model)``'s graph definition after ``model.train()``
        (Dropout on, BatchNorm on batch statistics).
      eval_graph: the same after ``model.eval()``.
    """

    train_graph: Any
    eval_graph: Any

    def __call__(
        self, variables, inputs, *, train: bool | None = None, rngs=None, mutable=False, **kwargs
    ):
        """The module's output (and ``{"batch_stats": new_state}`` with ``mutable``); ``rngs``
        is ignored: dropout draws from the module's own streams, kept in the state."""
        del rngs
        model = self.module(variables, train=bool(train))
        out = model(inputs, **kwargs)
        if mutable:
            return out, {"batch_stats": nnx.split(model, nnx.Param, ...)[2]}
        return out

    def module(self, variables, *, train: bool) -> nnx.Module:
        """The module with ``variables``, in training or evaluation mode. Rebuilt on each
        call, so its variables belong to the current trace (e.g. that of the gradient) and
        BatchNorm may update them."""
        graph = self.train_graph if train else self.eval_graph
        states = jax.tree.map(lambda a: a, (variables["params"], variables.get("batch_stats")))
        return nnx.merge(graph, *[s for s in states if s is not None])

    def layer_outputs(self, variables, inputs, *, train: bool) -> tuple[Any, dict[str, Any]]:
        """The module's output and every submodule's ``__call__`` output by its path
        (``"block/dense"``), captured with `flax.nnx.capture` (``method_outputs``)."""
        model = self.module(variables, train=train)
        out, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            inputs
        )
        layers = {}
        for path, value in named_leaves(captured).items():  # (*module, "__call__", ..., "0")
            if "__call__" in path[1:] and path[-1] == "0":  # a submodule's first call
                layers.setdefault("/".join(path[: path.index("__call__")]), value)
        return out, layers


def nnx_state(model: nnx.Module) -> tuple[NNXApply, Any, Any]:
    """``(apply_fn, params, rest)`` of an NNX module; the arrays are copies (training donates
    them). The caller's module is left as it was, its mode (``train()`` / ``eval()``)
    included: the graphs are taken from a clone."""
    model = nnx.clone(model)
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    train_graph, params, rest = nnx.split(model, nnx.Param, ...)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - traceable (keys too)
    return NNXApply(train_graph, eval_graph), copy(params), copy(rest)


def nnx_module(state: Any, *, train: bool = False) -> nnx.Module:
    """The NNX module of a state made from one (`create_train_state(nnx_model, ...)`), with
    the state's parameters and other variables (BatchNorm statistics, RNG streams), in
    evaluation mode unless ``train``. Its arrays are copies, so a later `fit` of the state
    (which donates it) leaves the module usable.

    Example:
      >>> state, _ = fit(create_train_state(model, tx, x, key), (x, y), epochs=5)
      >>> trained = nnx_module(state)          # or nnx_module(state.with_ema_params())
      >>> logits = trained(x_test)
    """
    if not isinstance(state.apply_fn, NNXApply):
        raise ConfigError(
            f"nnx_module needs a state made from an NNX module; this one runs "
            f"{type(state.apply_fn).__name__}",
            param="state",
        )
    graph = state.apply_fn.train_graph if train else state.apply_fn.eval_graph
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - traceable (keys too)
    return nnx.merge(graph, copy(state.params), copy(state.batch_stats))


def apply_model(
    state: Any, params: Any, inputs: Any, *, train: bool, key: jax.Array | None
) -> tuple[Any, Any]:
    """Run ``state``'s model on ``inputs``; returns ``(outputs, new_batch_stats)``.

    In training mode the ``batch_stats`` collection is mutable (its update is returned)
    and ``key`` is the ``dropout`` stream. `Flat` parameters (the fused optimizer's
    layout) are cut back into their tree here, inside the compiled step.
    """
    variables = {"params": unflatten_params(params)}
    rngs = {"dropout": key} if key is not None else None
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        if train:
            out, updates = state.apply_fn(
                variables, inputs, train=True, rngs=rngs, mutable=["batch_stats"]
            )
            return out, updates["batch_stats"]
    return state.apply_fn(variables, inputs, train=train, rngs=rngs), state.batch_stats
