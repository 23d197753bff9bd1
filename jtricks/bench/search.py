"""External tuning as AlgoPerf runs it: one search space, quasi-random trials, studies.

A search space maps hyper-parameter names to `Range`\\ s. `make_studies` draws ``M``
independent studies of ``N`` trials each: trial points come from a scrambled Halton (or
Sobol) sequence over the unit cube (`scipy.stats.qmc`, seeded), mapped onto each range
(log-uniform or uniform). Every trial gets its own run seed: trial ``k`` (counted over
all studies) runs with ``(seed + 1) 2^32 + 2k``, target-setting run ``k`` with
``(seed + 1) 2^32 + 2k + 1`` (`target_seeds`), so every run seed is distinct and no
scored run ever reuses a seed that set a target or tuned anything.

What is new here: scipy gives the low-discrepancy points; this module adds the
AlgoPerf bookkeeping (ranges with checks, studies, disjoint seed streams) and the
checks a user's search-space file needs.

References:
  Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf, 2023),
  https://arxiv.org/abs/2306.07179, and the AlgoPerf v0.6 rules (external tuning: a
  workload's time is the median over studies of each study's fastest trial);
  Bousquet et al., "Critical Hyper-Parameters: No Random, No Cry" (2017),
  https://arxiv.org/abs/1706.03200 (quasi-random search).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jtricks.errors import ConfigError, check_int

SCALES = ("log", "linear")
METHODS = ("halton", "sobol")


@dataclass(frozen=True)
class Range:
    """A hyper-parameter's interval ``[low, high]``, sampled log-uniformly or uniformly."""

    low: float
    high: float
    scale: str = "log"

    def check(self, name: str) -> Range:
        """Return ``self``, or raise `ConfigError` for an empty, inverted or (on a log
        scale) non-positive range, naming the hyper-parameter."""
        where = f"search space entry {name!r}"
        if self.scale not in SCALES:
            raise ConfigError(
                f"{where}: scale must be one of {', '.join(SCALES)}; got {self.scale!r}",
                param="search_space",
            )
        for bound in (self.low, self.high):
            if isinstance(bound, bool) or not isinstance(bound, int | float):
                raise ConfigError(
                    f"{where}: bounds must be numbers; got {bound!r}", param="search_space"
                )
            if not math.isfinite(bound):
                raise ConfigError(
                    f"{where}: bounds must be finite; got {bound!r}", param="search_space"
                )
        if not self.low < self.high:
            raise ConfigError(
                f"{where}: the range [{self.low}, {self.high}] is empty or inverted; give "
                "low < high",
                param="search_space",
            )
        if self.scale == "log" and self.low <= 0:
            raise ConfigError(
                f"{where}: a log-scale range needs low > 0; got {self.low}", param="search_space"
            )
        return self

    def value(self, u: float) -> float:
        """The point of the range at ``u`` in [0, 1): ``low (high / low)^u`` on a log
        scale, ``low + u (high - low)`` on a linear one."""
        if self.scale == "log":
            return float(self.low * (self.high / self.low) ** u)
        return float(self.low + u * (self.high - self.low))


DEFAULT_SPACE: dict[str, Range] = {
    "learning_rate": Range(1e-4, 3e-2, "log"),
    "one_minus_b1": Range(0.01, 0.2, "log"),
    "weight_decay": Range(1e-5, 1e-1, "log"),
    "warmup_fraction": Range(0.02, 0.1, "linear"),
    "label_smoothing": Range(0.0, 0.2, "linear"),
}
"""One search space for every workload (label smoothing applies to classification only)."""


SPACE_LEARNING_RATES: dict[str, Range] = {
    "heavy_ball": Range(1e-3, 1.0, "log"),
    "nesterov": Range(1e-3, 1.0, "log"),
    "lion": Range(1e-5, 3e-3, "log"),
}
"""Learning-rate ranges of the algorithms whose step size lives on another scale than
Adam's: SGD with momentum takes larger rates, Lion (a sign update) smaller ones."""


def space_for(algorithm: str) -> dict[str, Range]:
    """An algorithm's default search space: `DEFAULT_SPACE`, with its own learning-rate
    range from `SPACE_LEARNING_RATES` where it has one."""
    rate = SPACE_LEARNING_RATES.get(algorithm, DEFAULT_SPACE["learning_rate"])
    return {**DEFAULT_SPACE, "learning_rate": rate}


def search_space(spec: Mapping[str, Any]) -> dict[str, Range]:
    """A checked search space from a mapping such as ``{"learning_rate": {"low": 1e-4,
    "high": 1e-1, "scale": "log"}}`` (a parsed JSON file) or of `Range`\\ s.

    Raises:
      ConfigError: an empty space, an entry that is not a range, or a bad range.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"the search space must map hyper-parameter names to ranges; got {spec!r}",
            param="search_space",
        )
    space = {}
    for name, entry in spec.items():
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"low", "high", "scale"}
            if unknown or not {"low", "high"} <= set(entry):
                raise ConfigError(
                    f"search space entry {name!r} must have low, high and optionally scale; "
                    f"got {sorted(entry)}",
                    param="search_space",
                )
            entry = Range(entry["low"], entry["high"], entry.get("scale", "log"))
        if not isinstance(entry, Range):
            raise ConfigError(
                f"search space entry {name!r} must be a range; got {entry!r}", param="search_space"
            )
        space[str(name)] = entry.check(str(name))
    return space


def unit_points(num: int, dims: int, *, seed: int, method: str = "halton") -> np.ndarray:
    """``(num, dims)`` scrambled low-discrepancy points in [0, 1)^dims
    (`scipy.stats.qmc.Halton` or `scipy.stats.qmc.Sobol`), reproducible from ``seed``."""
    from scipy.stats import qmc

    if method not in METHODS:
        raise ConfigError(
            f"method must be one of {', '.join(METHODS)}; got {method!r}", param="method"
        )
    sampler = (qmc.Halton if method == "halton" else qmc.Sobol)(d=dims, scramble=True, seed=seed)
    if method == "sobol":
        return sampler.random_base2(max(0, math.ceil(math.log2(max(num, 1)))))[:num]
    return sampler.random(num)


@dataclass(frozen=True)
class Trial:
    """One run of a study: its hyper-parameters and its own run seed."""

    study: int
    index: int
    hparams: dict[str, float]
    seed: int


def make_studies(
    space: Mapping[str, Range],
    num_trials: int,
    num_studies: int,
    *,
    seed: int = 0,
    method: str = "halton",
) -> list[list[Trial]]:
    """``num_studies`` independent studies of ``num_trials`` quasi-random trials each.

    Study ``s`` draws its points from its own scrambled sequence (seeded by child ``s`` of
    ``SeedSequence(seed)``); every trial's run seed is distinct from every other's and
    from `target_seeds`. The same arguments give the same studies.
    """
    space = search_space(space)
    check_int("seed", seed, low=0, high=2**30)
    for name, value in (("num_trials", num_trials), ("num_studies", num_studies)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1; got {value!r}", param=name)
    studies = []
    for s, child in enumerate(np.random.SeedSequence(seed).spawn(num_studies)):
        u = unit_points(num_trials, len(space), seed=_int(child), method=method)
        studies.append(
            [
                Trial(s, i, _point(space, u[i]), _run_seed(seed, s * num_trials + i, 0))
                for i in range(num_trials)
            ]
        )
    return studies


def _point(space: Mapping[str, Range], u: np.ndarray) -> dict[str, float]:
    return {name: r.value(u[j]) for j, (name, r) in enumerate(space.items())}


def _run_seed(seed: int, k: int, target: int) -> int:
    return (seed + 1) * 2**32 + 2 * k + target


def target_seeds(num: int, *, seed: int = 0) -> list[int]:
    """Run seeds for target setting: odd offsets, which the trials of `make_studies`
    (even offsets) never use."""
    check_int("seed", seed, low=0, high=2**30)
    return [_run_seed(seed, k, 1) for k in range(num)]


def _int(seq: np.random.SeedSequence) -> int:
    return int(seq.generate_state(1, np.uint32)[0])
