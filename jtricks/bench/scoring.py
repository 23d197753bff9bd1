"""AlgoPerf-style scoring: time-to-target ratios, performance profiles, profile score.

For problems p and optimizers o with times-to-target ``t[p][o]`` (``inf`` when the
target was not reached):

* ratio ``r[p][o] = t[p][o] / min_o t[p][o]`` (``inf`` when ``o`` missed the target,
  or every optimizer did);
* performance profile ``rho_o(tau) = |{p : r[p][o] <= tau}| / |P|``;
* score ``S_o = 1 / (tau_max - 1) * integral_1^tau_max rho_o(tau) d tau`` — in [0, 1], 1 for
  an optimizer that is fastest on every problem. The profile is a step function, so
  the integral is exact: each problem adds ``(tau_max - max(1, r)) / |P|`` when
  ``r <= tau_max`` and nothing otherwise.

With several studies per workload (external tuning), a submission's time on a workload
is `workload_time`: the median over studies of each study's fastest trial. Beside the
profile score, `geometric_mean_speedup` gives each optimizer's geometric mean of
``t_baseline / t_o`` over the workloads both reached.

References:
  Dolan & Moré, "Benchmarking optimization software with performance profiles" (2002);
  Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf, 2023),
  https://arxiv.org/abs/2306.07179
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def performance_ratios(
    times: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """``t[p][o] / min_o t[p][o]`` per problem; ``inf`` for a missed target."""
    out: dict[str, dict[str, float]] = {}
    for problem, row in times.items():
        finite = [t for t in row.values() if math.isfinite(t)]
        best = min(finite) if finite else math.inf
        out[problem] = {opt: _ratio(t, best) for opt, t in row.items()}
    return out


def _ratio(t: float, best: float) -> float:
    if not (math.isfinite(t) and math.isfinite(best)):
        return math.inf
    if best == 0:
        return 1.0 if t == 0 else math.inf
    return t / best


def _optimizers(ratios: Mapping[str, Mapping[str, float]]) -> list[str]:
    seen: list[str] = []
    for row in ratios.values():
        for opt in row:
            if opt not in seen:
                seen.append(opt)
    return seen


def performance_profile(
    ratios: Mapping[str, Mapping[str, float]], taus: Sequence[float]
) -> dict[str, list[float]]:
    """``rho_o(tau)`` for every optimizer at every ``tau`` (fraction of problems)."""
    problems = list(ratios)
    return {
        opt: [
            sum(ratios[p].get(opt, math.inf) <= tau for p in problems) / len(problems)
            for tau in taus
        ]
        for opt in _optimizers(ratios)
    }


def profile_score(
    ratios: Mapping[str, Mapping[str, float]], tau_max: float = 4.0
) -> dict[str, float]:
    """The normalised area under each optimizer's profile over ``[1, tau_max]`` (exact)."""
    if tau_max <= 1:
        raise ValueError(f"tau_max must be > 1; got {tau_max}")
    problems = list(ratios)
    scores = {}
    for opt in _optimizers(ratios):
        area = 0.0
        for p in problems:
            r = ratios[p].get(opt, math.inf)
            if r <= tau_max:
                area += tau_max - max(1.0, r)
        scores[opt] = area / (len(problems) * (tau_max - 1.0))
    return scores


def default_taus(tau_max: float = 4.0, num: int = 61) -> list[float]:
    return [float(t) for t in np.linspace(1.0, tau_max, num)]


def study_time(trial_times: Sequence[float]) -> float:
    """A study's time on a workload: its fastest trial's time-to-target (``inf`` when no
    trial reached the target)."""
    return min((float(t) for t in trial_times), default=math.inf)


def workload_time(studies: Sequence[Sequence[float]]) -> float:
    """AlgoPerf's external-tuning time of a submission on a workload: the median over
    studies of each study's fastest trial (`study_time`). An even number of studies
    averages the middle two; a missed target counts as ``inf``."""
    if not studies:
        raise ValueError("workload_time needs at least one study")
    times = sorted(study_time(s) for s in studies)
    mid = len(times) // 2
    if len(times) % 2:
        return times[mid]
    low, high = times[mid - 1], times[mid]
    return math.inf if math.isinf(high) else (low + high) / 2


def geometric_mean_speedup(
    times: Mapping[str, Mapping[str, float]], baseline: str
) -> dict[str, dict[str, float]]:
    """Per optimizer, the geometric mean over workloads of ``t_baseline / t_optimizer``
    (above 1: faster than the baseline), over the workloads where both reached the
    target: ``{"speedup": g, "workloads": n}`` (``nan`` when ``n == 0``)."""
    out: dict[str, dict[str, float]] = {}
    for opt in _optimizers(times):
        logs = [
            math.log(row[baseline] / row[opt])
            for row in times.values()
            if baseline in row
            and opt in row
            and math.isfinite(row[baseline])
            and math.isfinite(row[opt])
            and row[opt] > 0
            and row[baseline] > 0
        ]
        speedup = math.exp(sum(logs) / len(logs)) if logs else math.nan
        out[opt] = {"speedup": speedup, "workloads": len(logs)}
    return out
