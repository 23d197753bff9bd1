"""Learning-rate schedules: functions ``step -> learning rate`` usable wherever optax takes one.

Optax's own schedules are used where they are exactly the rule; new here are the
texts' per-epoch multiplicative decay and the continuous exponential
``eta_0 exp(-lambda t)``, plus `build_schedule`, which reads a spec whose
arguments are in epochs (as the texts state them) and converts to steps.
Reduce-on-plateau is not a function of the step: it is a fit callback
(`jtricks.training.callbacks.ReduceLROnPlateau`) acting on `scale_by_plateau`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import optax

from jtricks.errors import ConfigError, check_int, check_range
from jtricks.spec import build_from_registry, parse_spec

Schedule = optax.Schedule
PATIENCE_MODES = ("keras", "pytorch")
"""How reduce-on-plateau counts patience (see `jtricks.training.callbacks.ReduceLROnPlateau`)."""


def constant(value: float) -> Schedule:
    """``eta_t = eta_0``."""
    check_range("learning_rate", value, low=0.0, low_inclusive=False)
    return optax.constant_schedule(value)


def per_epoch(value: float, factor: float, steps_per_epoch: int) -> Schedule:
    """Multiply by ``factor`` after every epoch: ``eta_t = eta_0 * factor ** floor(t / steps_per_epoch)``
    (e.g. factor 0.98). `optax.exponential_decay` with ``staircase=True``."""
    check_range("factor", factor, low=0.0, high=1.0, low_inclusive=False)
    check_int("steps_per_epoch", steps_per_epoch, low=1)
    return optax.exponential_decay(
        value, transition_steps=steps_per_epoch, decay_rate=factor, staircase=True
    )


def exponential(value: float, rate: float, steps_per_epoch: int = 1) -> Schedule:
    """Continuous exponential decay ``eta_t = eta_0 * exp(-rate * t / steps_per_epoch)``: with
    ``steps_per_epoch`` given, ``rate`` is per epoch (the texts' ``eta_0 exp(-lambda t)``, t in epochs)."""
    check_range("rate", rate, low=0.0)
    check_int("steps_per_epoch", steps_per_epoch, low=1)

    # exp(-rate)^(t / steps) is the same curve; optax computes it in the default float
    # dtype (float64 under x64)
    return optax.exponential_decay(value, steps_per_epoch, decay_rate=math.exp(-rate))


def step_decay(value: float, boundaries: Sequence[int], factor: float = 0.1) -> Schedule:
    """Drop by ``factor`` at each step in ``boundaries``: ``eta_t = eta_0 * factor ** #{b <= t}``.
    `optax.piecewise_constant_schedule`."""
    bounds = [check_int("boundary", b, low=1) for b in boundaries]
    check_range("factor", factor, low=0.0, low_inclusive=False)
    # a boundary given twice drops twice (optax's dict holds one scale per boundary)
    return optax.piecewise_constant_schedule(value, {b: factor ** bounds.count(b) for b in bounds})


def linear_warmup(value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Linear ramp from ``init_value`` to ``value`` over ``warmup_steps``, then constant."""
    check_int("warmup_steps", warmup_steps, low=1)
    return optax.join_schedules(
        [optax.linear_schedule(init_value, value, warmup_steps), optax.constant_schedule(value)],
        [warmup_steps],
    )


def warmup_cosine(
    value: float, warmup_steps: int, total_steps: int, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up from 0 to ``value`` over ``warmup_steps``, then cosine decay to ``end_value``
    at ``total_steps`` (`optax.warmup_cosine_decay_schedule`).

    References:
      Loshchilov & Hutter, "SGDR" (2017), https://arxiv.org/abs/1608.03983; Goyal et al. (2017),
      https://arxiv.org/abs/1706.02677
    """
    check_int("total_steps", total_steps, low=1)
    check_int("warmup_steps", warmup_steps, low=0, high=total_steps - 1)  # leaves a decay
    return optax.warmup_cosine_decay_schedule(0.0, value, warmup_steps, total_steps, end_value)


def cosine(value: float, total_steps: int, end_value: float = 0.0) -> Schedule:
    """Cosine decay ``eta_t = end + (eta_0 - end) (1 + cos(pi t / T)) / 2`` over ``total_steps``."""
    check_int("total_steps", total_steps, low=1)
    return optax.cosine_decay_schedule(value, total_steps, alpha=end_value / value)


def one_cycle(
    value: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One-cycle (Smith 2018): cosine up from ``value / div_factor`` to ``value`` over
    ``pct_start`` of training, then down to ``value / (div_factor * final_div_factor)``
    (`optax.cosine_onecycle_schedule`). References: https://arxiv.org/abs/1803.09820"""
    check_int("total_steps", total_steps, low=1)
    check_range(
        "pct_start", pct_start, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    return optax.cosine_onecycle_schedule(
        total_steps, value, pct_start, div_factor, final_div_factor
    )


# ----------------------------------------------------------------------------- specs (epochs)


@dataclass(frozen=True)
class Plateau:
    """Reduce-on-plateau settings from a schedule spec; `jtricks.train` turns them into a callback."""

    factor: float = 0.5
    patience: int = 5
    min_delta: float = 0.0
    monitor: str = "val_loss"
    mode: str = "min"
    min_scale: float = 1e-3
    patience_mode: str = "keras"

    def check(self, param: str | None = None) -> Plateau:
        """Return ``self`` after checking every setting; a `ConfigError` names ``param``
        (e.g. ``"schedule"``, the spec it came from) or else the setting itself."""
        try:
            check_range(
                "factor", self.factor, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
            )
            check_int("patience", self.patience, low=0)
            if self.patience_mode not in PATIENCE_MODES:
                raise ConfigError(
                    f"patience_mode must be one of {', '.join(PATIENCE_MODES)}; got "
                    f"{self.patience_mode!r}",
                    param="patience_mode",
                )
            check_range("min_delta", self.min_delta, low=0.0)
            check_range("min_scale", self.min_scale, low=0.0, high=1.0)
            if self.mode not in ("min", "max"):
                raise ConfigError(f"mode must be 'min' or 'max'; got {self.mode!r}", param="mode")
        except ConfigError as e:
            e.param = param or e.param
            raise
        return self


MONITORS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy")
"""What a ``plateau`` schedule spec may watch."""


def _plateau_spec(**settings: Any) -> Plateau:
    """The ``plateau(...)`` schedule spec: `Plateau` settings, checked, watching one of
    `MONITORS`."""
    plateau = Plateau(**settings).check(param="schedule")
    if plateau.monitor not in MONITORS:
        raise ConfigError(
            f"monitor must be {', '.join(MONITORS[:-1])} or {MONITORS[-1]}; got "
            f"{plateau.monitor!r}",
            param="schedule",
        )
    return plateau


_plateau_spec.__signature__ = inspect.signature(Plateau)  # its arguments are Plateau's


def _registry(value: float, steps_per_epoch: int, total_steps: int | None, ends: bool = True):
    spe = steps_per_epoch

    def total(name: str) -> int:
        if total_steps is None:
            raise ConfigError(
                f"the {name} schedule runs over the whole run: give total_steps "
                "(the run's optimizer steps) to build_schedule",
                param="total_steps",
            )
        return total_steps

    def epochs_to_steps(name: str, epochs: float) -> int:
        check_range(name, epochs, low=0.0)
        return max(1, round(epochs * spe)) if epochs > 0 else 0

    def within_run(what: str, epochs: float, steps: int, consequence: str) -> None:
        # a drop or a warm-up's end past the run leaves the rate the user asked for unreached
        # (like --swa past the last epoch); a library call without total_steps is not checked
        if ends and total_steps is not None and steps >= total_steps:
            raise ConfigError(
                f"{what}, after epoch {epochs:g}, lies at or past the run's end (epoch "
                f"{total_steps / spe:g}, step {total_steps:,}), so the rate would {consequence}; "
                "give epochs within the run",
                param="schedule",
            )

    def s_constant():
        return constant(value)

    def s_per_epoch(factor: float = 0.98):
        return per_epoch(value, factor, spe)

    def s_exponential(rate: float = 0.05):
        return exponential(value, rate, spe)

    def s_step(epochs: Sequence[float] = (), factor: float = 0.1):
        if isinstance(epochs, int | float):
            epochs = (epochs,)
        if not epochs:
            raise ConfigError("step schedule needs epochs=(e1, e2, ...)", param="schedule")
        steps = [epochs_to_steps("epochs", e) for e in epochs]
        schedule = step_decay(value, steps, factor)
        within_run("step schedule: its first drop", min(epochs), min(steps), "never drop")
        return schedule

    def s_warmup(epochs: float = 1.0):
        steps = max(1, epochs_to_steps("epochs", epochs))
        within_run("warmup schedule: its warm-up's end", epochs, steps, "never reach its peak")
        return linear_warmup(value, steps)

    def s_warmup_cosine(warmup_epochs: float = 1.0, end_factor: float = 0.0):
        warm = epochs_to_steps("warmup_epochs", warmup_epochs)
        end = total("warmup_cosine")
        within_run("warmup_cosine schedule: its warm-up's end", warmup_epochs, warm, "never decay")
        return warmup_cosine(value, warm, end, value * end_factor)

    def s_cosine(end_factor: float = 0.0):
        check_range("end_factor", end_factor, low=0.0, high=1.0)
        return cosine(value, total("cosine"), value * end_factor)

    def s_one_cycle(
        pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4
    ):
        return one_cycle(value, total("one_cycle"), pct_start, div_factor, final_div_factor)

    return {
        "constant": s_constant,
        "per_epoch": s_per_epoch,
        "exponential": s_exponential,
        "step": s_step,
        "warmup": s_warmup,
        "warmup_cosine": s_warmup_cosine,
        "cosine": s_cosine,
        "one_cycle": s_one_cycle,
        "plateau": _plateau_spec,
    }


SCHEDULE_NAMES = tuple(_registry(1.0, 1, 1))

WHOLE_RUN = ("warmup_cosine", "cosine", "one_cycle")
"""The schedules laid over the whole run, from its total steps (`build_schedule` refuses
them without): a longer run has another rate at every step."""


def spans_the_run(spec: str) -> bool:
    """Whether the schedule ``spec`` is one of `WHOLE_RUN`."""
    return parse_spec(spec, what="schedule")[0] in WHOLE_RUN


def build_schedule(
    spec: str,
    value: float,
    *,
    steps_per_epoch: int = 1,
    total_steps: int | None = None,
    within_run: bool = True,
) -> Schedule | Plateau:
    """Build a schedule from a spec whose durations are in epochs, for a run of ``total_steps``.

    ``steps_per_epoch`` (default 1: durations in steps) converts epochs to steps;
    ``total_steps`` is needed only by the schedules that span the whole run
    (``warmup_cosine``, ``cosine``, ``one_cycle``), which refuse to be built without it.
    ``within_run=False`` builds a step drop or a warm-up's end past the run's end without
    refusing it (a run folder written before that refusal, rebuilt to load or resume).

    Specs: ``constant``, ``per_epoch(factor=0.98)``, ``exponential(rate=0.05)`` (per epoch),
    ``step(epochs=(30, 60), factor=0.1)`` (multiply by factor after epochs 30 and 60, like
    PyTorch's MultiStepLR), ``warmup(epochs=1)``,
    ``warmup_cosine(warmup_epochs=1, end_factor=0)``, ``cosine(end_factor=0)``,
    ``one_cycle(pct_start=0.3, div_factor=25, final_div_factor=1e4)``,
    ``plateau(factor=0.5, patience=5, min_delta=0, monitor='val_loss', mode='min', min_scale=1e-3,
    patience_mode='keras')`` (``'pytorch'`` drops one epoch later, see
    `jtricks.training.callbacks.ReduceLROnPlateau`).

    Returns:
      A schedule ``step -> lr``, or a `Plateau` for reduce-on-plateau.

    Raises:
      ConfigError: unknown name (listing the valid ones), bad argument, a whole-run
        schedule without ``total_steps``, or a step schedule's first drop or a warm-up's
        end at or past ``total_steps`` (the rate would never drop, or never reach ``value``).
    """
    check_range("learning_rate", value, low=0.0, low_inclusive=False)
    check_int("steps_per_epoch", steps_per_epoch, low=1)
    if total_steps is not None:
        check_int("total_steps", total_steps, low=1)
    built = build_from_registry(
        spec, _registry(value, steps_per_epoch, total_steps, within_run), what="schedule"
    )
    return built if isinstance(built, Plateau) else in_default_float(built)


def in_default_float(schedule: Schedule) -> Schedule:
    """``schedule`` evaluated on the step count cast to the default float dtype, so it is
    float64 under ``jax_enable_x64`` (optax's schedules compute in float32 from the int32
    step count that `optax.inject_hyperparams` keeps) and unchanged otherwise."""

    def wrapped(count):
        return schedule(jnp.asarray(count, jnp.result_type(float)))

    return wrapped
