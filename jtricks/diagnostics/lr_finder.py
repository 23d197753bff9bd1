"""The learning-rate finders: `lr_finder` (K rates side by side in one vmapped program)
and `lr_range_test` (Smith's single run with a rising rate)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.errors import ConfigError, check_int, check_range
from jtricks.optim.pipeline import set_learning_rate
from jtricks.plotting import save_figure, subplots
from jtricks.tasks import Task, as_task
from jtricks.training.data_checks import as_arrays, check_data, num_examples
from jtricks.training.epoch import ArrayFeed, make_part_program
from jtricks.training.options import StepLog
from jtricks.training.state import TrainState, create_train_state, device_copy
from jtricks.training.steps import LossFn, make_train_step


@dataclass
class LRFinderResult:
    """`lr_finder`'s result.

    ``lrs`` (K,), ``losses`` (K, steps) per-step training losses, ``final`` (K,) the mean
    loss over the last quarter of the steps (NaN for a run that diverged), ``best`` the
    rate with the lowest final loss, and ``suggestion`` the same rate (see `lr_finder`).
    """

    lrs: np.ndarray
    losses: np.ndarray
    final: np.ndarray
    suggestion: float
    best: float

    def plot(self, path: Any) -> None:
        """Final loss against learning rate (log axis), with the suggestion marked."""
        fig, ax = subplots(figsize=(6, 4))
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
    train_data: Any,
    *,
    key: jax.Array,
    lr_min: float = 1e-5,
    lr_max: float = 1.0,
    num: int = 32,
    lrs: Sequence[float] | None = None,
    steps: int = 100,
    batch_size: int = 100,
    loss_fn: LossFn | None = None,
    task: Task | str | None = None,
) -> LRFinderResult:
    """Train ``num`` copies of a model side by side, each at its own fixed learning rate
    ``lr_k = lr_min (lr_max / lr_min)^(k / (num - 1))`` (or the given ``lrs``), for
    ``steps`` steps on the same batches, in ONE compiled program; suggest the rate with
    the lowest final loss.

    ``make_tx(learning_rate)`` builds the optimizer: any optax one (``optax.adam``), whose
    rate becomes a value in the optimizer state (`rate_varied`: injected, or a multiplier
    of its updates), so the K states are stacked and `fit`'s part program trains them
    together, the step vmapped over them (`make_lr_sweep`). All copies start from the
    same parameters. A copy that diverges keeps its last finite
    parameters and its loss reads NaN from then on.

    Unlike Smith's single run with a rising rate, each rate is trained for the whole
    budget, so the curve does not depend on how fast the rate ramps, and its lowest point
    is the rate that trained best: the range test's rule, the steepest descent
    (`steepest_descent`), answers for the lag of a rising rate, which the sweep has not.
    On MNIST-1D (six model and optimizer pairs, ``jtricks diagnose`` then ``jtricks
    train --lr`` at each rate) the steepest-descent rate tested 2.6 points below the
    lowest-loss one on average (from 0.2 above to 6.7 below).

    ``train_data`` is any batch pytree, checked as `fit` checks it; the loss is ``task``'s
    (a `jtricks.tasks.Task` or its name: regression, a dict batch with a mask, ...) or
    ``loss_fn``'s, as in `fit` (neither: classification).
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
    task = as_task(task, loss_fn)
    run = make_lr_sweep(
        model, make_tx, train_data, key=key, steps=steps, batch_size=batch_size, task=task
    )
    losses = np.asarray(run(jnp.asarray(lrs, jnp.float32)), np.float64)
    losses[np.cumsum(~np.isfinite(losses), axis=1) > 0] = np.nan  # diverged stays diverged
    tail = losses[:, -max(1, steps // 4) :]
    final = np.where(np.isfinite(tail).all(axis=1), tail.mean(axis=1), np.nan)
    finite = np.isfinite(final)
    if not finite.any():
        raise ValueError("every learning rate diverged; lower lr_min and lr_max")
    best = float(lrs[finite][np.argmin(final[finite])])
    return LRFinderResult(lrs, losses, final, best, best)


@dataclass
class LRRangeTestResult:
    """`lr_range_test`'s result.

    ``lrs`` (steps,) the rate of each step, ``losses`` (steps,) the batch losses,
    ``smoothed`` (steps,) their bias-corrected moving average (NaN from the divergence
    on), ``diverged_at`` the first step cut off as diverged (``None`` if none was),
    ``suggestion`` the rate of steepest descent of ``smoothed`` (`range_suggestion`),
    ``best`` the rate at its minimum (the older fastai rule suggests ``best / 10``).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    diverged_at: int | None
    suggestion: float
    best: float

    def plot(self, path: Any) -> None:
        """Batch loss (faint) and smoothed loss against the rising rate, suggestion marked."""
        end = len(self.lrs) if self.diverged_at is None else self.diverged_at
        fig, ax = subplots(figsize=(6, 4))
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


def range_suggestion(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """The range test's suggestion: `steepest_descent` of the smoothed losses, leaving
    out the first tenth of the steps (the moving average still leans on a few noisy
    batches there: its bias-corrected start is the first batch's loss) and the last five,
    as fastai's ``lr_find`` does before it suggests; the whole curve when fewer than three
    points would remain.

    References:
      fastai ``Learner.lr_find`` (``lrs[num_it//10:-5]``)."""
    lrs, smoothed = np.asarray(lrs), np.asarray(smoothed)
    lo, hi = len(lrs) // 10, len(lrs) - 5
    if hi - lo < 3 or not np.isfinite(smoothed[lo:hi]).any():
        return steepest_descent(lrs, smoothed)
    return steepest_descent(lrs[lo:hi], smoothed[lo:hi])


def lr_range_test(
    model: nn.Module,
    make_tx: Callable[[float], optax.GradientTransformation],
    train_data: Any,
    *,
    steps: int = 100,
    batch_size: int = 100,
    key: jax.Array,
    lr_min: float = 1e-7,
    lr_max: float = 10.0,
    beta: float = 0.98,
    diverge: float = 4.0,
    loss_fn: LossFn | None = None,
    task: Task | str | None = None,
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
    `steepest_descent` of the smoothed curve past its first tenth and before its last five
    steps (`range_suggestion`), as fastai's "steep" suggestion.
    ``make_tx``, ``train_data``, ``task`` and ``loss_fn`` are as in `lr_finder`.

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
    task = as_task(task, loss_fn)
    run = make_lr_sweep(
        model, make_tx, train_data, key=key, steps=steps, batch_size=batch_size, task=task
    )
    losses = np.asarray(run(jnp.asarray(lrs[None, :], jnp.float32))[0], np.float64)
    smoothed, diverged_at = smooth_losses(losses, beta=beta, diverge=diverge)
    if np.isnan(smoothed).all():
        raise ValueError("the loss was not finite at the first step; lower lr_min")
    best = float(lrs[np.nanargmin(smoothed)])
    return LRRangeTestResult(
        lrs, losses, smoothed, diverged_at, range_suggestion(lrs, smoothed), best
    )


def make_lr_sweep(
    model: nn.Module,
    make_tx: Callable[[float], optax.GradientTransformation],
    train_data: Any,
    *,
    key: jax.Array,
    steps: int,
    batch_size: int,
    loss_fn: LossFn | None = None,
    task: Task | str | None = None,
) -> LRSweep:
    """The compiled core of `lr_finder` and `lr_range_test`: ``run(lrs) -> losses (K, steps)``.

    ``lrs`` is ``(K,)``, one fixed rate per copy, or ``(K, steps)``, a rate per copy and
    step (copy k takes step i at ``lrs[k, i]``). The K copies are stacked states trained
    by `fit`'s own part program (`jtricks.training.epoch.make_part_program`: the step
    vmapped over them, every step recorded on the device, `StepLog`), one call per epoch
    of the same batches as ``fit(data_key=fold_in(key, 1))``; each copy's rates ride in
    its optimizer state (`rate_table`), so the program compiles once per K. Every call
    trains K fresh copies from the same initialisation. Loss i of a copy is the batch loss
    before its update i, NaN for a skipped (non-finite) step.
    """
    steps = check_int("steps", steps, low=1)
    task = as_task(task, loss_fn)
    data = as_arrays(train_data, "training data")
    batch_size = check_int("batch_size", batch_size, low=1, high=num_examples(data))
    tx = make_tx(1.0)
    state = create_train_state(model, rate_table(tx, steps), task.inputs(data), key)
    data = jax.tree.map(jnp.asarray, check_data(state, task, data, "training data"))
    if not _injected_rate(state.opt_state.inner):
        table = rate_table(rate_varied(tx), steps)
        state = state.replace(tx=table, opt_state=table.init(state.params))
    program = make_part_program(make_train_step(task=task, norms=False), log=StepLog(1))
    feed = ArrayFeed(data, jax.random.fold_in(key, 1), 0, 0, batch_size)
    return LRSweep(program, state, feed, steps)


class RateTableState(NamedTuple):
    """`rate_table`'s state: the optimizer's own, the ``rates`` of its updates, the
    ``count`` of updates made."""

    inner: Any
    rates: jax.Array
    count: jax.Array


def rate_table(tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """``tx`` (its ``learning_rate`` injected, `optax.inject_hyperparams`) with update i at
    ``rates[min(i, steps - 1)]``, a table of ``steps`` rates in the state (ones at
    ``init``; replace it per copy). A skipped update keeps the state, so its count too:
    the next one takes the same rate. New here: optax schedules are functions fixed at
    build time; a table in the state lets K copies with their own rates share one
    compiled program."""
    tx = optax.with_extra_args_support(tx)

    def init(params: Any) -> RateTableState:
        rates = jnp.ones((steps,), jnp.float32)
        return RateTableState(tx.init(params), rates, jnp.zeros([], jnp.int32))

    def update(updates, state: RateTableState, params=None, **extra):
        rate = state.rates[jnp.minimum(state.count, steps - 1)]
        inner = set_learning_rate(state.inner, rate)
        updates, inner = tx.update(updates, inner, params, **extra)
        return updates, RateTableState(inner, state.rates, state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


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
    """`make_lr_sweep`'s program: ``run(lrs)`` trains and returns the losses (NumPy,
    ``(K, steps)``); ``run.lower(lrs)`` is the lowered program of its first call
    (``.compile().cost_analysis()``...).

    The training data and the initial state are arguments of the compiled program, not
    constants folded into it, so a large dataset does not bloat compilation.
    """

    program: Any
    state: TrainState
    feed: ArrayFeed
    steps: int

    @property
    def length(self) -> int:
        """Steps per program call: an epoch's, or all of them when fewer."""
        return min(self.steps, num_examples(self.feed.data) // self.feed.batch_size)

    def __call__(self, lrs: jax.Array) -> np.ndarray:
        states, losses, done = self.copies(lrs), [], 0
        while done < self.steps:
            n = min(self.length, self.steps - done)
            states, acc = self._call(states, done // self.length, n)
            losses.append((acc["rows"], n))
            done += n
        rows = jax.device_get(losses)
        return np.concatenate(
            [np.where(r["nonfinite"][:n] > 0, np.nan, r["loss"][:n]) for r, n in rows]
        ).T

    def lower(self, lrs: jax.Array) -> Any:
        return self._call(self.copies(lrs), 0, self.length, lower=True)

    def copies(self, lrs: jax.Array) -> TrainState:
        """K fresh copies of the initial state, copy k's rate table from ``lrs[k]``."""
        lrs = jnp.asarray(lrs, jnp.float32)
        if lrs.ndim not in (1, 2) or (lrs.ndim == 2 and lrs.shape[1] != self.steps):
            raise ConfigError(
                f"lrs must have shape (K,) or (K, {self.steps}) (one rate per copy and "
                f"step); got {lrs.shape}",
                param="lrs",
            )
        table = jnp.broadcast_to(lrs.reshape(lrs.shape[0], -1), (lrs.shape[0], self.steps))
        stacked = jax.vmap(
            lambda r: self.state.replace(opt_state=self.state.opt_state._replace(rates=r))
        )(table)
        return device_copy(stacked)  # a copy of one may share the state's buffers: it is donated

    def _call(self, states: TrainState, epoch: int, n: int, lower: bool = False) -> Any:
        feed = self.feed.replace(epoch=jnp.int32(epoch), offset=jnp.int32(0))
        args = (states, jnp.int32(0), feed, jnp.int32(n), jnp.int32(2**31 - 1))
        call = self.program.lower if lower else self.program
        return call(*args, length=self.length, finish=False)
