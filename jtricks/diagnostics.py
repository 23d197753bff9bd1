"""Diagnostics that tell why training fails (T04, T21, T27, T28).

* `check_gradients` (T28): central differences in float64 against `jax.grad`,
  coordinates sampled in every layer, a per-layer table and a verdict.
* `overfit_one_batch` (T27): can the model and optimizer drive the loss on one
  small batch to ~0? If not, something between data, model and update is broken.
* `initial_loss` : at initialisation the cross-entropy should be about ``log C``.
* `signal_propagation` (T04): per-layer activation mean / std and gradient norm,
  with flags for vanishing and exploding signals; `track_signal` records it at
  chosen steps of a real run.
* `lr_finder` (T21): K learning rates over an exponential range, trained side by
  side from the same initialisation in one compiled program (`jax.vmap` over the
  optimizer's injected learning rate, `lax.scan` over steps); suggests the rate
  of steepest descent of the loss against log learning rate. `lr_range_test` is
  Smith's single run with a rising rate, at the cost of one run.

Everything works on a `jtricks.training.TrainState`, so any Flax Linen model
with the ``(x, *, train)`` signature can be diagnosed. What is new relative to
jax / flax / optax: `jax.test_util.check_grads` checks whole functions with a
pass/fail assertion; here the check is per layer of a Flax model, with dropout
fixed and BatchNorm forced to its running averages (through
`flax.linen.intercept_methods`), and reports errors instead of raising.

References:
  Karpathy, "A Recipe for Training Neural Networks" (2019), http://karpathy.github.io/2019/04/25/recipe/;
  Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks" (2010);
  Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), https://arxiv.org/abs/1506.01186
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from jtricks.data.batching import epoch_indices
from jtricks.errors import ConfigError, check_int, check_range
from jtricks.losses import cross_entropy
from jtricks.optim.pipeline import set_learning_rate
from jtricks.training.model import apply_model
from jtricks.training.state import TrainState, create_train_state
from jtricks.training.steps import LossFn, make_train_step
from jtricks.training.transfer import forward_layers

# ----------------------------------------------------------------------------- helpers


def _layer_of(path: tuple[str, ...]) -> str:
    """``("Dense_0", "kernel") -> "Dense_0"``: a leaf's layer is its module path."""
    return "/".join(path[:-1]) if len(path) > 1 else path[0]


def _layers(params: Any, order: Sequence[str] = ()) -> dict[str, list[tuple[str, ...]]]:
    """Leaves of ``params`` grouped by layer, layers sorted by their position in ``order``
    (the forward call order from `forward_layers`; unknown layers go last)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for path in traverse_util.flatten_dict(params):
        out.setdefault(_layer_of(path), []).append(path)
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _bn_eval_interceptor(next_fun, args, kwargs, context):
    """Force every `flax.linen.BatchNorm` to use its running averages."""
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    if module.use_running_average is None:
        return next_fun(*args, **{**kwargs, "use_running_average": True})
    # set at construction (the usual ``use_running_average=not train``): override it for
    # this one call, then put it back; flax forbids passing it at both places
    saved = module.use_running_average
    object.__setattr__(module, "use_running_average", True)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", saved)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- gradient check


@dataclass
class GradCheckReport:
    """Per-layer result of `check_gradients`.

    ``rows``: one dict per layer with ``layer``, ``coords`` (sampled), ``max_rel_error``,
    ``max_abs_error`` and ``passed``. ``passed`` is True when every layer passed.
    """

    rows: list[dict[str, Any]]
    tolerance: float
    passed: bool

    def table(self) -> str:
        return _table(
            ["layer", "coords", "max rel error", "max abs error", "verdict"],
            [
                (
                    r["layer"],
                    r["coords"],
                    f"{r['max_rel_error']:.2e}",
                    f"{r['max_abs_error']:.2e}",
                    "pass" if r["passed"] else "FAIL",
                )
                for r in self.rows
            ],
        )


def check_gradients(
    state: TrainState,
    x: Any,
    y: Any,
    *,
    loss_fn: LossFn = cross_entropy,
    coords_per_layer: int = 10,
    eps: float = 1e-5,
    tolerance: float = 1e-4,
    floor: float = 1e-4,
    train: bool = True,
    seed: int = 0,
) -> GradCheckReport:
    """Compare `jax.grad` of the mean loss with central differences, in float64, per layer.

    For each sampled coordinate ``i`` of the flattened parameters,
    ``g_num = (L(w + eps e_i) - L(w - eps e_i)) / (2 eps)`` and the error is
    ``|g - g_num| / max(|g|, |g_num|, floor)``. A layer passes when its largest error is
    at most ``tolerance``. Everything (parameters, inputs, BatchNorm statistics) is cast
    to float64 inside `jax.enable_x64`, so rounding error (about ``1e-16 L / eps``) and
    truncation error (``O(eps^2)``) both sit far below the tolerance, and a wrong
    backward pass (a bad `jax.custom_vjp`, a misplaced `stop_gradient`) stands out by
    orders of magnitude. ``floor`` keeps coordinates whose true gradient is ~0 (dead
    ReLUs) from dividing rounding noise by zero.

    With ``train=True`` (the default) the model runs in training mode with a fixed
    dropout key, and every BatchNorm is forced to its running averages, so the loss is
    a smooth, deterministic function of the parameters. ``train=False`` checks the
    evaluation-mode function instead.

    Args:
      state: the model and parameters to check (its ``key`` fixes the dropout masks).
      x, y: a small batch (a few examples suffice; each coordinate costs two forward passes).
      coords_per_layer: coordinates sampled per layer (all of a layer's if it has fewer).
      seed: picks the coordinates.

    Returns:
      A `GradCheckReport` (``.table()`` formats it).
    """
    check_int("coords_per_layer", coords_per_layer, low=1)
    check_range("eps", eps, low=0.0, low_inclusive=False)
    check_range("tolerance", tolerance, low=0.0, low_inclusive=False)
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(  # noqa: E731
            lambda a: (
                jnp.asarray(a, jnp.float64)
                if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                else a
            ),
            t,
        )
        params, batch_stats = to64(state.params), to64(state.batch_stats)
        x64, y = to64(jnp.asarray(x)), jnp.asarray(y)
        flat, unravel = ravel_pytree(params)
        variables_extra = {"batch_stats": batch_stats} if batch_stats else {}
        rngs = {"dropout": state.key} if train and state.key is not None else None

        def loss(theta):
            variables = {"params": unravel(theta), **variables_extra}
            with nn.intercept_methods(_bn_eval_interceptor):
                logits = state.apply_fn(variables, x64, train=train, rngs=rngs)
            return jnp.mean(loss_fn(logits, y))

        # the flat index range of every leaf, grouped by layer
        offsets, start = {}, 0
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            path = tuple(str(getattr(k, "key", k)) for k in keypath)
            offsets[path] = (start, int(np.size(leaf)))  # ravel_pytree's order
            start += int(np.size(leaf))
        sampled: dict[str, np.ndarray] = {}
        for layer, paths in _layers(params, forward_layers(state, x)).items():
            idx = np.concatenate([np.arange(s, s + n) for s, n in (offsets[p] for p in paths)])
            k = min(coords_per_layer, idx.size)
            sampled[layer] = np.sort(rng.choice(idx, size=k, replace=False))
        all_idx = jnp.asarray(np.concatenate(list(sampled.values())))

        @jax.jit
        def both(theta, idx):
            analytic = jax.grad(loss)(theta)[idx]

            def central(i):
                e = jnp.zeros_like(theta).at[i].set(eps)
                return (loss(theta + e) - loss(theta - e)) / (2 * eps)

            return analytic, jax.lax.map(central, idx)

        analytic, numeric = (np.asarray(a) for a in both(flat, all_idx))
    abs_err = np.abs(analytic - numeric)
    rel_err = abs_err / np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    rows, pos = [], 0
    for layer, idx in sampled.items():
        sl = slice(pos, pos + idx.size)
        pos += idx.size
        worst = float(rel_err[sl].max())
        rows.append(
            {
                "layer": layer,
                "coords": int(idx.size),
                "max_rel_error": worst,
                "max_abs_error": float(abs_err[sl].max()),
                "passed": bool(worst <= tolerance),
            }
        )
    return GradCheckReport(rows, tolerance, all(r["passed"] for r in rows))


# ----------------------------------------------------------------------------- overfit one batch


@dataclass
class OverfitReport:
    """Result of `overfit_one_batch`: the loss of every step, and the verdict."""

    losses: np.ndarray
    epsilon: float
    steps_to_epsilon: int | None
    passed: bool

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1])


def overfit_one_batch(
    model: nn.Module,
    tx: optax.GradientTransformation,
    x: Any,
    y: Any,
    *,
    key: jax.Array,
    steps: int = 300,
    epsilon: float = 0.01,
    loss_fn: LossFn = cross_entropy,
) -> OverfitReport:
    """Train a fresh model on one batch ``(x, y)`` for ``steps`` steps (one compiled `lax.scan`).

    Passes when the training loss falls below ``epsilon`` within ``steps`` steps: a correct
    model with enough capacity memorises a small batch (Karpathy 2019). Failing points to
    a bug such as labels that change from step to step, a layer cut off from the gradient,
    or a learning rate far off. Turn dropout off for this check (its noise keeps the
    training loss up).
    """
    check_int("steps", steps, low=1)
    check_range("epsilon", epsilon, low=0.0, low_inclusive=False)
    x, y = jnp.asarray(x), jnp.asarray(y)
    state = create_train_state(model, tx, x, key)
    train_step = make_train_step(loss_fn, norms=False, skip_nonfinite=False)

    @jax.jit
    def run(state):
        def body(s, _):
            s, m = train_step(s, (x, y))
            return s, m["loss"]

        return jax.lax.scan(body, state, None, length=steps)[1]

    losses = np.asarray(run(state))
    below = np.flatnonzero(losses < epsilon)
    first = int(below[0]) + 1 if below.size else None
    return OverfitReport(losses, epsilon, first, first is not None)


# ----------------------------------------------------------------------------- initial loss


@dataclass
class InitialLossReport:
    """`initial_loss`'s result: the measured loss, ``log C``, their ratio and the verdict."""

    loss: float
    expected: float
    ratio: float
    tolerance: float
    passed: bool


def initial_loss(
    state: TrainState,
    x: Any,
    y: Any,
    *,
    num_classes: int,
    loss_fn: LossFn = cross_entropy,
    tolerance: float = 0.25,
) -> InitialLossReport:
    """Cross-entropy at initialisation (evaluation mode) against ``log C``.

    A freshly initialised classifier should predict nearly uniform probabilities, so the
    loss should be about ``log C`` (2.303 for 10 classes). Passes when
    ``|loss / log C - 1| <= tolerance``. Much larger means over-confident initial logits
    (too large a last-layer initialisation, an unscaled input), much smaller a label leak.
    """
    check_int("num_classes", num_classes, low=2)
    logits, _ = apply_model(state, state.params, jnp.asarray(x), train=False, key=None)
    loss = float(jnp.mean(loss_fn(logits, jnp.asarray(y))))
    expected = math.log(num_classes)
    ratio = loss / expected
    return InitialLossReport(loss, expected, ratio, tolerance, bool(abs(ratio - 1) <= tolerance))


# ----------------------------------------------------------------------------- signal propagation


@dataclass
class SignalReport:
    """Per-layer statistics of one forward and backward pass (`signal_propagation`).

    ``rows``: per layer, in forward order: ``layer``, ``act_mean``, ``act_std`` (of the
    layer's output), ``grad_norm`` (L2 norm of the gradient of its parameters).
    ``grad_ratio`` = first layer's gradient norm / last layer's; ``act_ratio`` = last
    layer's output std / first layer's. ``flags`` names what is wrong (empty: healthy).
    """

    step: int
    rows: list[dict[str, Any]]
    grad_ratio: float
    act_ratio: float
    flags: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.flags

    def table(self) -> str:
        return _table(
            ["layer", "act mean", "act std", "grad norm"],
            [
                (
                    r["layer"],
                    f"{r['act_mean']:+.3e}",
                    f"{r['act_std']:.3e}",
                    f"{r['grad_norm']:.3e}",
                )
                for r in self.rows
            ],
        )


def signal_propagation(
    state: TrainState,
    x: Any,
    y: Any,
    *,
    loss_fn: LossFn = cross_entropy,
    threshold: float = 1e3,
) -> SignalReport:
    """Activation mean / std and parameter-gradient norm of every layer, on one batch.

    Activations are each layer's output (``capture_intermediates``, forward order) in
    training mode with the state's dropout key; BatchNorm uses batch statistics (as in
    training) and its running averages are not changed. Flags:

    * ``vanishing gradients``: first layer's gradient norm / last layer's < ``1 / threshold``;
    * ``exploding gradients``: that ratio > ``threshold``, or a non-finite gradient;
    * ``exploding activations`` / ``vanishing activations``: last layer's output std /
      first layer's beyond ``threshold`` either way, or non-finite activations.

    ``threshold`` is 1e3 by default (three orders of magnitude across the depth).
    References: Glorot & Bengio (2010); He et al., "Delving Deep into Rectifiers" (2015).
    """
    check_range("threshold", threshold, low=1.0, low_inclusive=False)
    x, y = jnp.asarray(x), jnp.asarray(y)
    rngs = {"dropout": jax.random.fold_in(state.key, state.step)} if state.key is not None else None

    def loss(params):
        variables = {"params": params}
        mutable = ["intermediates"]
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            mutable.append("batch_stats")
        logits, coll = state.apply_fn(
            variables, x, train=True, rngs=rngs, mutable=mutable, capture_intermediates=True
        )
        return jnp.mean(loss_fn(logits, y)), coll["intermediates"]

    grads, inter = jax.jit(jax.grad(loss, has_aux=True))(state.params)
    layers = _layers(state.params, forward_layers(state, x))
    flat_inter = traverse_util.flatten_dict(jax.device_get(inter))
    flat_grads = traverse_util.flatten_dict(jax.device_get(grads))
    rows = []
    for layer, paths in layers.items():
        outs = [
            v for p, v in flat_inter.items() if "/".join(p[:-1]) == layer and p[-1] == "__call__"
        ]
        act = np.asarray(outs[0][0], np.float64) if outs else None
        gnorm = math.sqrt(
            sum(float(np.sum(np.square(flat_grads[p], dtype=np.float64))) for p in paths)
        )
        rows.append(
            {
                "layer": layer,
                "act_mean": float(act.mean()) if act is not None else float("nan"),
                "act_std": float(act.std()) if act is not None else float("nan"),
                "grad_norm": gnorm,
            }
        )
    first, last = rows[0], rows[-1]
    grad_ratio = first["grad_norm"] / last["grad_norm"] if last["grad_norm"] > 0 else math.inf
    act_ratio = last["act_std"] / first["act_std"] if first["act_std"] > 0 else math.inf
    flags = _signal_flags(rows, grad_ratio, act_ratio, threshold)
    return SignalReport(int(state.step), rows, grad_ratio, act_ratio, flags)


def _signal_flags(
    rows: list[dict[str, Any]], grad_ratio: float, act_ratio: float, threshold: float
) -> list[str]:
    """The flags of `signal_propagation` from its rows and first/last ratios."""
    flags = []
    if not all(math.isfinite(r["grad_norm"]) for r in rows):
        flags.append("exploding gradients (non-finite)")
    elif grad_ratio < 1 / threshold:
        flags.append(f"vanishing gradients (first/last layer gradient norm {grad_ratio:.1e})")
    elif grad_ratio > threshold:
        flags.append(f"exploding gradients (first/last layer gradient norm {grad_ratio:.1e})")
    if not all(math.isfinite(r["act_std"]) for r in rows if not math.isnan(r["act_std"])):
        flags.append("exploding activations (non-finite)")
    elif act_ratio > threshold:
        flags.append(f"exploding activations (last/first layer output std {act_ratio:.1e})")
    elif act_ratio < 1 / threshold:
        flags.append(f"vanishing activations (last/first layer output std {act_ratio:.1e})")
    return flags


def track_signal(
    state: TrainState,
    train_data: tuple[Any, Any],
    *,
    at_steps: Sequence[int],
    batch_size: int,
    probe_size: int = 256,
    data_key: jax.Array | None = None,
    **fit_kwargs: Any,
) -> tuple[TrainState, list[SignalReport]]:
    """Train with `jtricks.training.fit` and take a `signal_propagation` report at each of
    ``at_steps`` (0 = at initialisation), on the first ``probe_size`` training examples.

    Training is split into `fit` calls at the requested steps; split calls continue
    exactly, so the run is the same as one uninterrupted call.
    """
    from jtricks.training.fit import fit

    at = sorted({check_int("at_steps", int(s), low=0) for s in at_steps})
    x, y = (np.asarray(a) for a in train_data)
    probe = (x[:probe_size], y[:probe_size])
    if data_key is None:
        data_key = jax.random.fold_in(state.key, 1)
    reports = []
    for target in at:
        if target > int(state.step):
            state, _ = fit(
                state,
                train_data,
                batch_size=batch_size,
                steps=target - int(state.step),
                data_key=data_key,
                **fit_kwargs,
            )
        reports.append(signal_propagation(state, *probe))
    return state, reports


# ----------------------------------------------------------------------------- LR finder


@dataclass
class LRFinderResult:
    """`lr_finder`'s result.

    ``lrs`` (K,), ``losses`` (K, steps) per-step training losses, ``final`` (K,) the mean
    loss over the last quarter of the steps (NaN for a run that diverged), ``suggestion``
    the rate of steepest descent, ``best`` the rate with the lowest final loss.
    """

    lrs: np.ndarray
    losses: np.ndarray
    final: np.ndarray
    suggestion: float
    best: float

    def plot(self, path: Any) -> None:
        """Final loss against learning rate (log axis), with the suggestion marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.final, marker=".")
        ax.axvline(self.suggestion, color="C3", ls="--", label=f"suggestion {self.suggestion:.2e}")
        ax.set(
            xscale="log", xlabel="learning rate", ylabel="final training loss", title="LR finder"
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def steepest_descent(lrs: np.ndarray, final: np.ndarray) -> float:
    """The rate where ``final`` falls fastest against ``log lr``, searched up to the minimum.

    Diverged runs (non-finite loss) are cut off. ``d final / d log lr`` is taken by central
    differences (`numpy.gradient`) on the points up to the lowest loss; the most negative
    slope wins. With fewer than three usable points, the lowest-loss rate is returned.
    """
    lrs, final = np.asarray(lrs, np.float64), np.asarray(final, np.float64)
    ok = np.isfinite(final)
    if not ok.any():
        raise ValueError("every learning rate diverged; lower lr_min and lr_max")
    lrs, final = lrs[ok], final[ok]
    stop = int(np.argmin(final)) + 1
    if stop < 3:
        return float(lrs[stop - 1])
    slope = np.gradient(final[:stop], np.log(lrs[:stop]))
    return float(lrs[int(np.argmin(slope))])


def lr_finder(
    model: nn.Module,
    make_tx: Callable[[float], optax.GradientTransformation],
    train_data: tuple[Any, Any],
    *,
    key: jax.Array,
    lr_min: float = 1e-5,
    lr_max: float = 1.0,
    num: int = 32,
    lrs: Sequence[float] | None = None,
    steps: int = 100,
    batch_size: int = 100,
    loss_fn: LossFn = cross_entropy,
) -> LRFinderResult:
    """Train ``num`` copies of a model side by side, each at its own fixed learning rate
    ``lr_k = lr_min (lr_max / lr_min)^(k / (num - 1))`` (or the given ``lrs``), for
    ``steps`` steps on the same batches, in ONE compiled program; suggest the rate of
    steepest descent (`steepest_descent`).

    ``make_tx(learning_rate)`` must build an optimizer whose learning rate is injected
    with `optax.inject_hyperparams` (every `jtricks.optim.build_optimizer` pipeline is),
    so the rate is a value in the optimizer state: the K states are stacked, one train step
    is `jax.vmap`-ed over them, and a `lax.scan` runs the steps (`make_lr_sweep`). All
    copies start from the same parameters. A copy that diverges keeps its last finite
    parameters and its loss reads NaN from then on.

    Unlike Smith's single run with a rising rate, each rate is trained for the whole
    budget, so the curve does not depend on how fast the rate ramps.
    """
    if lrs is None:
        check_range("lr_min", lr_min, low=0.0, low_inclusive=False)
        check_range("lr_max", lr_max, low=lr_min, low_inclusive=False)
        lrs = np.geomspace(lr_min, lr_max, check_int("num", num, low=2))
    else:
        lrs = np.asarray(lrs, np.float64)
        if lrs.ndim != 1 or lrs.size == 0 or not np.all(np.isfinite(lrs) & (lrs > 0)):
            raise ConfigError(
                f"lrs must be a non-empty sequence of positive numbers; got {lrs!r}", param="lrs"
            )
    run = make_lr_sweep(
        model, make_tx, train_data, key=key, steps=steps, batch_size=batch_size, loss_fn=loss_fn
    )
    losses = np.asarray(run(jnp.asarray(lrs, jnp.float32)), np.float64)
    losses[np.cumsum(~np.isfinite(losses), axis=1) > 0] = np.nan  # diverged stays diverged
    tail = losses[:, -max(1, steps // 4) :]
    final = np.where(np.isfinite(tail).all(axis=1), tail.mean(axis=1), np.nan)
    finite = np.isfinite(final)
    best = float(lrs[finite][np.argmin(final[finite])]) if finite.any() else float("nan")
    return LRFinderResult(lrs, losses, final, steepest_descent(lrs, final), best)


@dataclass
class LRRangeTestResult:
    """`lr_range_test`'s result.

    ``lrs`` (steps,) the rate of each step, ``losses`` (steps,) the batch losses,
    ``smoothed`` (steps,) their bias-corrected moving average (NaN from the divergence
    on), ``diverged_at`` the first step cut off as diverged (``None`` if none was),
    ``suggestion`` the rate of steepest descent of ``smoothed``, ``best`` the rate at its
    minimum (the older fastai rule suggests ``best / 10``).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    diverged_at: int | None
    suggestion: float
    best: float

    def plot(self, path: Any) -> None:
        """Batch loss (faint) and smoothed loss against the rising rate, suggestion marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        end = len(self.lrs) if self.diverged_at is None else self.diverged_at
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs[:end], self.losses[:end], color="C0", alpha=0.3, label="batch loss")
        ax.plot(self.lrs, self.smoothed, color="C0", label="smoothed")
        ax.axvline(self.suggestion, color="C3", ls="--", label=f"suggestion {self.suggestion:.2e}")
        low = min(np.nanmin(self.smoothed), np.nanmin(self.losses[:end]))
        high = np.nanmax(self.smoothed)  # batch-loss spikes would flatten the curve
        ax.set(
            xscale="log",
            xlabel="learning rate",
            ylabel="training loss",
            title="LR range test",
            ylim=(low - 0.05 * (high - low), high + 0.25 * (high - low)),
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def smooth_losses(
    losses: np.ndarray, *, beta: float = 0.98, diverge: float = 4.0
) -> tuple[np.ndarray, int | None]:
    """The range test's smoothing and divergence rule (as in fastai's ``lr_find``).

    ``a_i = beta a_{i-1} + (1 - beta) loss_i`` with ``a_{-1} = 0``, reported bias-corrected
    as ``s_i = a_i / (1 - beta^(i+1))``. Step i diverges when ``loss_i`` is not finite or
    ``s_i > diverge * min(s_0..s_i)``; ``s`` is NaN from the first such step on.

    Returns:
      ``(s, first diverged step or None)``.
    """
    losses = np.asarray(losses, np.float64)
    smoothed = np.full(losses.shape, np.nan)
    avg, low = 0.0, math.inf
    for i, loss in enumerate(losses):
        if not np.isfinite(loss):
            return smoothed, i
        avg = beta * avg + (1 - beta) * loss
        s = avg / (1 - beta ** (i + 1))
        low = min(low, s)
        if s > diverge * low:
            return smoothed, i
        smoothed[i] = s
    return smoothed, None


def lr_range_test(
    model: nn.Module,
    make_tx: Callable[[float], optax.GradientTransformation],
    train_data: tuple[Any, Any],
    *,
    key: jax.Array,
    lr_min: float = 1e-7,
    lr_max: float = 10.0,
    steps: int = 100,
    batch_size: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    loss_fn: LossFn = cross_entropy,
) -> LRRangeTestResult:
    """Smith's LR range test: ONE run whose rate rises exponentially, step i at
    ``lr_i = lr_min (lr_max / lr_min)^(i / (steps - 1))``; suggest the rate where the
    smoothed loss falls fastest against ``log lr``.

    The cheap companion of `lr_finder`: it costs one training run of ``steps`` steps (it
    is `make_lr_sweep` with one copy and a per-step rate), where `lr_finder` trains every
    rate for the whole budget. Its curve mixes rate and training time (the loss at a rate
    depends on the rates before it), so ramp slowly enough that the loss can follow.
    Losses are smoothed and cut at divergence by `smooth_losses` (fastai's defaults:
    ``beta=0.98``, divergence at 4x the lowest smoothed loss); the suggestion is
    `steepest_descent` of the smoothed curve, as fastai's "steep" suggestion.
    ``make_tx`` is as in `lr_finder` (its learning rate injected).

    References:
      Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), section 3.3,
      https://arxiv.org/abs/1506.01186; fastai ``Learner.lr_find``.
    """
    check_range("lr_min", lr_min, low=0.0, low_inclusive=False)
    check_range("lr_max", lr_max, low=lr_min, low_inclusive=False)
    steps = check_int("steps", steps, low=2)
    check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    check_range("diverge", diverge, low=1.0, low_inclusive=False)
    lrs = np.geomspace(lr_min, lr_max, steps)
    run = make_lr_sweep(
        model, make_tx, train_data, key=key, steps=steps, batch_size=batch_size, loss_fn=loss_fn
    )
    losses = np.asarray(run(jnp.asarray(lrs[None, :], jnp.float32))[0], np.float64)
    smoothed, diverged_at = smooth_losses(losses, beta=beta, diverge=diverge)
    if np.isnan(smoothed).all():
        raise ValueError("the loss was not finite at the first step; lower lr_min")
    best = float(lrs[np.nanargmin(smoothed)])
    return LRRangeTestResult(
        lrs, losses, smoothed, diverged_at, steepest_descent(lrs, smoothed), best
    )


def make_lr_sweep(
    model: nn.Module,
    make_tx: Callable[[float], optax.GradientTransformation],
    train_data: tuple[Any, Any],
    *,
    key: jax.Array,
    steps: int,
    batch_size: int,
    loss_fn: LossFn = cross_entropy,
) -> LRSweep:
    """The compiled core of `lr_finder` and `lr_range_test`: ``run(lrs) -> losses (K, steps)``.

    ``lrs`` is ``(K,)``, one fixed rate per copy, or ``(K, steps)``, a rate per copy and
    step (copy k takes step i at ``lrs[k, i]``). Compiles once per shape of ``lrs``; every
    call trains K fresh copies from the same initialisation on the same batches. Loss i of
    a copy is the batch loss before its update i. Exposed so a benchmark can time
    compilation and the run separately.
    """
    steps = check_int("steps", steps, low=1)
    x, y = (jnp.asarray(a) for a in train_data)
    batch_size = check_int("batch_size", batch_size, low=1, high=x.shape[0])
    state = create_train_state(model, make_tx(1.0), x, key)
    if not any(
        hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda n: hasattr(n, "hyperparams"))
    ):
        raise ConfigError(
            "make_tx must return an optimizer built with optax.inject_hyperparams "
            "(e.g. jtricks.optim.build_optimizer) so its learning rate can be varied",
            param="make_tx",
        )

    def with_lr(s, lr):
        return s.replace(opt_state=set_learning_rate(s.opt_state, lr))

    train_step = make_train_step(loss_fn, norms=False)
    steps_per_epoch = x.shape[0] // batch_size
    data_key = jax.random.fold_in(key, 1)
    epochs = -(-steps // steps_per_epoch)

    @jax.jit
    def sweep(lrs, state, x, y):
        if lrs.ndim not in (1, 2) or (lrs.ndim == 2 and lrs.shape[1] != steps):
            raise ConfigError(
                f"lrs must have shape (K,) or (K, {steps}) (one rate per copy and step); "
                f"got {lrs.shape}",
                param="lrs",
            )
        per_step = lrs.ndim == 2
        states = jax.vmap(with_lr, in_axes=(None, 0))(state, lrs[:, 0] if per_step else lrs)
        idx = jnp.concatenate(
            [
                epoch_indices(
                    jax.random.fold_in(data_key, e), x.shape[0], batch_size, steps_per_epoch
                )
                for e in range(epochs)
            ]
        )[:steps]

        def body(states, inputs):
            i, lr = inputs
            if per_step:
                states = jax.vmap(with_lr)(states, lr)
            states, m = jax.vmap(train_step, in_axes=(0, None))(states, (x[i], y[i]))
            return states, jnp.where(m["nonfinite"] > 0, jnp.nan, m["loss"])

        rates = lrs.T if per_step else jnp.zeros((steps, 0))
        return jax.lax.scan(body, states, (idx, rates))[1].T

    return LRSweep(sweep, (state, x, y))


@dataclass(frozen=True)
class LRSweep:
    """`make_lr_sweep`'s program: ``run(lrs)`` trains and returns the losses;
    ``run.lower(lrs)`` is the lowered program (``.compile().cost_analysis()``...).

    The training data and the initial state are arguments of the compiled program, not
    constants folded into it, so a large dataset does not bloat compilation.
    """

    fn: Callable[..., jax.Array]
    args: tuple[Any, ...]

    def __call__(self, lrs: jax.Array) -> jax.Array:
        return self.fn(lrs, *self.args)

    def lower(self, lrs: jax.Array) -> Any:
        return self.fn.lower(lrs, *self.args)


# ----------------------------------------------------------------------------- all checks


def _plot_signal(reports: list[SignalReport], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_g) = plt.subplots(1, 2, figsize=(11, 4))
    for rep in reports:
        layers = [r["layer"] for r in rep.rows]
        ax_a.plot(
            range(len(layers)),
            [r["act_std"] for r in rep.rows],
            marker=".",
            label=f"step {rep.step}",
        )
        ax_g.plot(
            range(len(layers)),
            [r["grad_norm"] for r in rep.rows],
            marker=".",
            label=f"step {rep.step}",
        )
    for ax, title in ((ax_a, "activation std"), (ax_g, "gradient norm")):
        ax.set(yscale="log", xlabel="layer (forward order)", title=title)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_overfit(rep: OverfitReport, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(rep.losses) + 1), rep.losses)
    ax.axhline(rep.epsilon, color="C3", ls="--", label=f"epsilon {rep.epsilon:g}")
    ax.set(yscale="log", xlabel="step", ylabel="training loss", title="overfit one batch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def diagnose(
    *,
    dataset: str = "mnist1d",
    model: str = "cnn",
    optimizer: str = "adam",
    learning_rate: float = 1e-2,
    batch_size: int = 100,
    preprocess: str = "standardize",
    seed: int = 0,
    overfit_batch: int = 32,
    overfit_steps: int = 300,
    overfit_epsilon: float = 0.01,
    signal_steps: Sequence[int] = (0, 100, 500),
    lr_min: float = 1e-5,
    lr_max: float = 1.0,
    lr_num: int = 32,
    lr_steps: int = 100,
    lr_method: str = "sweep",
    out: Any = None,
) -> dict[str, Any]:
    """Run every check on a model and dataset given by name; what ``jtricks diagnose`` runs.

    Checks, in order: initial loss, gradient check (on 8 examples), overfit one batch
    (``overfit_batch`` examples, ``overfit_steps`` steps), signal propagation at
    ``signal_steps`` of an ordinary run with ``optimizer`` at ``learning_rate``, and the LR
    finder: ``lr_method="sweep"`` is `lr_finder` (``lr_num`` rates, ``lr_steps`` steps
    each), ``"range"`` is `lr_range_test` (one run of ``lr_steps`` steps, the rate rising
    from ``lr_min`` to ``lr_max``). The data is the training split, standardised on itself; the test split is not
    touched. With ``out``, writes ``diagnose.json``, ``lr_finder.png``, ``signal.png`` and
    ``overfit.png`` there (the folder must be new or empty).

    Returns:
      ``{"checks": [{"check", "passed", "detail"}, ...], "passed": bool, "reports": {...}}``.
    """
    from jtricks.data import Scaler, load_dataset
    from jtricks.nn import build_model
    from jtricks.optim import build_optimizer
    from jtricks.run import _prepare_out, environment, write_json

    # every number is checked before anything is created on disk
    check_int("overfit_steps", overfit_steps, low=1)
    check_range("overfit_epsilon", overfit_epsilon, low=0.0, low_inclusive=False)
    for s in signal_steps:
        check_int("signal_steps", s, low=0)
    if not signal_steps:
        raise ConfigError(
            "signal_steps must list at least one step, e.g. (0, 100)", param="signal_steps"
        )
    check_range("lr_min", lr_min, low=0.0, low_inclusive=False)
    check_range("lr_max", lr_max, low=lr_min, low_inclusive=False)
    check_int("lr_num", lr_num, low=2)
    check_int("lr_steps", lr_steps, low=2 if lr_method == "range" else 1)
    if lr_method not in ("sweep", "range"):
        raise ConfigError(
            f"lr_method must be 'sweep' or 'range'; got {lr_method!r}", param="lr_method"
        )
    check_int("seed", seed, low=0, high=2**63 - 1)
    data = load_dataset(dataset)
    net = build_model(model, data.num_classes)
    tx = build_optimizer(optimizer, learning_rate)
    check_int("batch_size", batch_size, low=1, high=len(data.y_train))
    check_int("overfit_batch", overfit_batch, low=1, high=len(data.y_train))
    x = Scaler.fit(preprocess, data.x_train)(data.x_train)
    y = data.y_train
    run_dir = _prepare_out(out) if out is not None else None
    key = jax.random.key(seed)
    state = create_train_state(net, tx, x, key)
    checks, reports = [], {}

    init = initial_loss(state, x[:1000], y[:1000], num_classes=data.num_classes)
    checks.append(
        {
            "check": "initial loss",
            "passed": init.passed,
            "detail": f"{init.loss:.3f} vs log C = {init.expected:.3f} (ratio {init.ratio:.2f})",
        }
    )
    reports["initial_loss"] = dataclasses.asdict(init)

    grad = check_gradients(state, x[:8], y[:8])
    worst = max(grad.rows, key=lambda r: r["max_rel_error"])
    checks.append(
        {
            "check": "gradient check",
            "passed": grad.passed,
            "detail": f"max rel error {worst['max_rel_error']:.1e} ({worst['layer']}), tol {grad.tolerance:g}",
        }
    )
    reports["gradient_check"] = dataclasses.asdict(grad)

    over = overfit_one_batch(
        net,
        tx,
        x[:overfit_batch],
        y[:overfit_batch],
        key=key,
        steps=overfit_steps,
        epsilon=overfit_epsilon,
    )
    checks.append(
        {
            "check": "overfit one batch",
            "passed": over.passed,
            "detail": (
                f"loss < {over.epsilon:g} at step {over.steps_to_epsilon}"
                if over.passed
                else f"final loss {over.final_loss:.3g} after {len(over.losses)} steps (epsilon {over.epsilon:g})"
            ),
        }
    )
    reports["overfit"] = {**dataclasses.asdict(over), "losses": over.losses.tolist()}

    _, signals = track_signal(
        create_train_state(net, tx, x, key), (x, y), at_steps=signal_steps, batch_size=batch_size
    )
    for rep in signals:
        checks.append(
            {
                "check": f"signal propagation, step {rep.step}",
                "passed": rep.passed,
                "detail": "; ".join(rep.flags)
                or f"grad ratio first/last {rep.grad_ratio:.2g}, act std ratio last/first {rep.act_ratio:.2g}",
            }
        )
    reports["signal"] = [dataclasses.asdict(r) for r in signals]

    def listed(a: np.ndarray) -> list[float | None]:
        return [float(v) if np.isfinite(v) else None for v in a]

    finder_args = dict(key=key, lr_min=lr_min, lr_max=lr_max, steps=lr_steps, batch_size=batch_size)
    make_tx = lambda lr: build_optimizer(optimizer, lr)  # noqa: E731
    if lr_method == "range":
        finder = lr_range_test(net, make_tx, (x, y), **finder_args)
        lowest = "smoothed loss lowest"
        reports["lr_finder"] = {
            "method": "range",
            "lrs": finder.lrs.tolist(),
            "losses": listed(finder.losses),
            "smoothed": listed(finder.smoothed),
            "diverged_at": finder.diverged_at,
        }
    else:
        finder = lr_finder(net, make_tx, (x, y), num=lr_num, **finder_args)
        lowest = "lowest loss"
        reports["lr_finder"] = {
            "method": "sweep",
            "lrs": finder.lrs.tolist(),
            "final": listed(finder.final),
        }
    reports["lr_finder"].update(suggestion=finder.suggestion, best=finder.best)
    checks.append(
        {
            "check": "LR finder" if lr_method == "sweep" else "LR range test",
            "passed": True,
            "detail": f"suggested {finder.suggestion:.2e} ({lowest} at {finder.best:.2e}; given {learning_rate:g})",
        }
    )
    result = {"checks": checks, "passed": all(c["passed"] for c in checks), "reports": reports}
    if run_dir is not None:
        finder.plot(run_dir / "lr_finder.png")
        _plot_signal(signals, run_dir / "signal.png")
        _plot_overfit(over, run_dir / "overfit.png")
        settings = {
            "dataset": dataset,
            "model": model,
            "optimizer": optimizer,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "seed": seed,
            "lr_method": lr_method,
        }
        write_json(
            run_dir / "diagnose.json",
            {**result, "settings": settings, "environment": environment()},
        )
        result["out"] = run_dir
    return result


def verdict_table(result: dict[str, Any]) -> str:
    """The checks of `diagnose` as a plain-text table."""
    return _table(
        ["check", "verdict", "detail"],
        [(c["check"], "pass" if c["passed"] else "FAIL", c["detail"]) for c in result["checks"]],
    )
