"""How a trial is timed, as AlgoPerf's rules time it.

The clock runs while the model trains, from the first step: compiling the training
program is part of the time (the first call of the training chunk compiles it).
Evaluation is not timed: the clock stops before each evaluation and restarts after it.
The model is evaluated every ``eval_period`` steps; the trial's time-to-target is the
training time at the first evaluation that reaches the target, and a trial that has
not reached it when its training time passes ``max_runtime`` stops there with an
infinite time.

`timed_trial` takes the training and evaluation as callables and the clock as an
argument, so the rules are tested with a fake clock (and the same code times real runs
with `time.perf_counter`).

References:
  Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf, 2023),
  https://arxiv.org/abs/2306.07179, and the AlgoPerf v0.6 rules (timing: compilation
  counted, evaluation excluded, ``max_runtime`` per workload).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jtricks.errors import ConfigError, check_int, check_range


@dataclass
class TrialTiming:
    """A timed trial: ``time_to_target`` (``inf`` if never reached), the training time
    and step of every evaluation with its metric (``curve``), and the total time spent
    evaluating (reported, never counted)."""

    time_to_target: float
    steps_to_target: int | None
    curve: list[dict[str, Any]] = field(default_factory=list)
    eval_time: float = 0.0
    train_time: float = 0.0


def timed_trial(
    train: Callable[[int], None],
    evaluate: Callable[[], float],
    reached: Callable[[float], bool],
    *,
    eval_period: int,
    total_steps: int,
    max_runtime: float,
    clock: Callable[[], float] = time.perf_counter,
) -> TrialTiming:
    """Run a trial under the timing rules.

    Args:
      train: ``train(n)`` runs the next ``n`` training steps and returns when they are
        done (block on the device); its first call compiles.
      evaluate: the validation metric of the current state (untimed).
      reached: whether a metric value reaches the workload's target.
      eval_period: steps between evaluations.
      total_steps: the step budget; training stops there if the target was not reached.
      max_runtime: training seconds after which the trial stops unreached.
      clock: seconds, monotonic (`time.perf_counter`; a fake clock in tests).
    """
    check_int("eval_period", eval_period, low=1)
    check_int("total_steps", total_steps, low=1)
    check_range("max_runtime", max_runtime, low=0.0, low_inclusive=False)
    result = TrialTiming(math.inf, None)
    step = 0
    while step < total_steps and result.train_time < max_runtime:
        n = min(eval_period, total_steps - step)
        start = clock()
        train(n)
        result.train_time += clock() - start
        step += n
        start = clock()
        metric = float(evaluate())
        result.eval_time += clock() - start
        result.curve.append({"step": step, "time": result.train_time, "metric": metric})
        if reached(metric) and result.train_time <= max_runtime:
            result.time_to_target, result.steps_to_target = result.train_time, step
            break
    return result


def reaches(metric: str, target: float) -> Callable[[float], bool]:
    """The target test of a metric: lower is better for a loss or an error rate,
    higher for anything else (accuracy, R², ...); NaN never reaches."""
    if not isinstance(target, int | float) or isinstance(target, bool) or not math.isfinite(target):
        raise ConfigError(f"target must be a finite number; got {target!r}", param="target")
    return (lambda v: v <= target) if lower_is_better(metric) else (lambda v: v >= target)


def lower_is_better(metric: str) -> bool:
    """A loss, an error, a squared or absolute error or a perplexity improves downwards;
    anything else (accuracy, R², IoU, ...) upwards."""
    return metric in ("loss", "mse", "mae", "perplexity") or metric.endswith(
        ("_loss", "error", "error_rate")
    )
