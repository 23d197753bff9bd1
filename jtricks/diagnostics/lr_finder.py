"""The learning-rate finders: `lr_finder` (K rates side by side in one vmapped program)
and `lr_range_test` (Smith's single run with a rising rate)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.data.batching import epoch_indices
from jtricks.errors import ConfigError, check_int, check_range
from jtricks.losses import cross_entropy
from jtricks.optim.pipeline import set_learning_rate
from jtricks.plotting import pyplot, save_figure
from jtricks.training.state import create_train_state
from jtricks.training.steps import LossFn, make_train_step


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
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.final, marker=".")
        ax.axvline(self.suggestion, color="C3", ls="--", label=f"suggestion {self.suggestion:.2e}")
        ax.set(
            xscale="log", xlabel="learning rate", ylabel="final training loss", title="LR finder"
        )
        save_figure(fig, path, axes=(ax,))


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

    ``make_tx(learning_rate)`` builds the optimizer: any optax one (``optax.adam``), whose
    rate becomes a value in the optimizer state (`rate_varied`: injected, or a multiplier
    of its updates), so the K states are stacked, one train step is `jax.vmap`-ed over them, and a `lax.scan` runs the steps (`make_lr_sweep`). All
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
        plt = pyplot()

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
        save_figure(fig, path, axes=(ax,))


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
    steps: int = 100,
    batch_size: int = 100,
    key: jax.Array,
    lr_min: float = 1e-7,
    lr_max: float = 10.0,
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
    ``make_tx`` is as in `lr_finder` (any optax optimizer, see `rate_varied`).

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
    if not _injected_rate(state.opt_state):
        state = create_train_state(model, rate_varied(state.tx), x, key)

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


def _injected_rate(opt_state: Any) -> bool:
    return any(
        hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
        for s in jax.tree.leaves(opt_state, is_leaf=lambda n: hasattr(n, "hyperparams"))
    )


def _rate_multiplier(learning_rate: Any) -> optax.GradientTransformation:
    return optax.scale(learning_rate)


def rate_varied(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """An optimizer built at rate 1 (``make_tx(1.0)``) with a learning rate the sweep can
    set in its state.

    `make_lr_sweep` uses an optimizer whose rate is already injected
    (`optax.inject_hyperparams`, every `jtricks.optim.build_optimizer` pipeline) as it is.
    Any other (``optax.adam``, ``jtricks.optim.adam``, your own) gets its updates
    multiplied by an injected ``learning_rate``: the same update as building it at that rate for
    every optimizer whose update is proportional to its rate (SGD, momentum, Adam, AdamW,
    RMSProp, Adagrad, Lion, ...). For one whose rate enters otherwise (schedule-free,
    Prodigy) inject the rate yourself: ``optax.inject_hyperparams(f)(learning_rate=lr)``.
    """
    return optax.chain(tx, optax.inject_hyperparams(_rate_multiplier)(learning_rate=1.0))


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
