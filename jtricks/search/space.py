"""A hyper-parameter search space from one line, and the samplers that draw trials from it.

``"lr=loguniform(1e-4, 1e-1), weight_decay=loguniform(1e-6, 1e-2), batch_size=choice(32,
64, 128), label_smoothing=uniform(0, 0.2)"`` names `jtricks.TrainConfig` fields (``lr``
is ``learning_rate``'s flag), arguments of the optimizer, or ``STAGE.ARG``, the argument
of another stage of the pipeline (``l2.lam``, ``clip_global_norm.max_norm``,
``lookahead.alpha``: `trial_config`), and a distribution each: ``loguniform(low,
high)``, ``uniform(low, high)`` (the bench's `jtricks.bench.search.Range`) or
``choice(v1, v2, ...)`` (any literals). Samplers
(`make_sampler`): ``grid`` (every combination; a range gives ``points`` values, evenly
spaced on its scale), ``random`` (scrambled Halton points, `jtricks.bench.search.unit_points`:
quasi-random search) and ``tpe`` (Optuna's tree-structured Parzen estimator through its
ask/tell interface, ``pip install 'jtricks[search]'``). Every sampler is an iterator of
trial values with ``tell(values, metric)``; only TPE reads what it is told.

What is new here: the one-line spec and one ask/tell face over grid, quasi-random and
Optuna's TPE; the points come from scipy and Optuna.

References:
  Bergstra & Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012);
  Bergstra et al., "Algorithms for Hyper-Parameter Optimization" (NeurIPS 2011) (TPE);
  Akiba et al., "Optuna" (KDD 2019), https://arxiv.org/abs/1907.10902
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from jtricks.bench.search import Range, unit_points
from jtricks.errors import ConfigError, check_int
from jtricks.run.config import TrainConfig
from jtricks.run.settings import flag_of
from jtricks.spec import parse_spec, split_top_level

SAMPLERS = ("grid", "random", "tpe")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A categorical dimension: one of ``values``."""

    values: tuple[Any, ...]

    def value(self, u: float) -> Any:
        """The value at ``u`` in [0, 1): the ``floor(u k)``-th of the ``k`` values."""
        return self.values[min(int(u * len(self.values)), len(self.values) - 1)]


@dataclasses.dataclass(frozen=True)
class Integers(Range):
    """An integer train setting's range (``batch_size``, ``epochs``, ...): the range's
    point rounded to the nearest integer, so both ends are drawn (Optuna's ``suggest_int``,
    with ``log`` on a log scale)."""

    def value(self, u: float) -> int:
        """``floor(x + 1/2)`` of `Range.value`'s point ``x`` at ``u``."""
        return math.floor(super().value(u) + 0.5)


Dimension = Range | Choice
INTEGER_FIELDS = frozenset(
    f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "int | None")
)
"""The train settings that take integers: a range over one draws integers (`Integers`)."""


def _field_names() -> dict[str, str]:
    """``{name or flag spelling: TrainConfig field}``: ``learning_rate``, ``lr``, ..."""
    names = {}
    for field in dataclasses.fields(TrainConfig):
        names[field.name] = field.name
        names[flag_of(field).lstrip("-").replace("-", "_")] = field.name
    return names


def parse_space(spec: str) -> dict[str, Dimension]:
    """``{TrainConfig field: Range | Choice}`` from ``"name=dist(...), ..."``.

    Raises:
      ConfigError (``param="space"``): an entry that is not ``name=dist(args)``, a name
      that is not a config field, a name given twice, an unknown distribution or bad
      bounds.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"space must be 'name=dist(...), ...'; got {spec!r}", param="space")
    fields, space = _field_names(), {}
    for entry in split_top_level(spec, ","):
        name, eq, dist = entry.partition("=")
        name = name.strip()
        if not eq or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(
                f"space entry {entry!r}: expected NAME=loguniform(a, b) | uniform(a, b) | "
                "choice(v, ...) with NAME a train setting (lr, batch_size, "
                "label_smoothing, ...), an argument of the optimizer (weight_decay, b1, ...) "
                "or STAGE.ARG, one of another stage of the pipeline (l2.lam, lookahead.alpha)",
                param="space",
            )
        field = fields.get(name, name)
        if field in space:
            raise ConfigError(f"space names {field!r} twice", param="space")
        space[field] = _dimension(field, dist)
    return space


def trial_config(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """``base`` with a trial's values: config fields replaced, any other name given to
    the optimizer spec's first stage as a keyword (``adamw`` + ``weight_decay=1e-4`` is
    ``adamw(weight_decay=0.0001)``; the optimizer checks it when it is built), and
    ``STAGE.ARG`` to the stage named ``STAGE`` (``adam | l2(lam=1e-4)`` + ``l2.lam=1e-3``
    is ``adam | l2(lam=0.001)``).

    Raises:
      ConfigError (``param="space"``): optimizer arguments for an optimizer given as a
      dict or list rather than a spec string.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in values.items() if k in names}
    extra = {k: v for k, v in values.items() if k not in names}
    if extra:
        settings["optimizer"] = with_arguments(settings.get("optimizer", base.optimizer), extra)
    return dataclasses.replace(base, **settings)


def with_arguments(spec: Any, arguments: dict[str, Any]) -> str:
    """The optimizer spec ``spec`` with ``arguments`` set on their stages (`stage_arguments`)."""
    parts = []
    for text, name, args, kwargs, given in stage_arguments(spec, arguments):
        kwargs = {**kwargs, **given}
        inside = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        parts.append(f"{name}({inside})" if given else text)
    return " | ".join(parts)


def stage_arguments(spec: Any, arguments: dict[str, Any]) -> list[tuple]:
    """The stages of the pipeline string ``spec``, each ``(text, name, args, kwargs,
    given)``: ``given`` the arguments that go to it, a bare name to the first stage,
    ``STAGE.ARG`` to the one stage named ``STAGE`` (``optax.lion.b1``: ``optax.lion``'s).

    Raises:
      ConfigError (``param="space"``): ``spec`` not a string, or ``STAGE`` naming no stage
        or more than one.
    """
    if not isinstance(spec, str):
        raise ConfigError(
            f"space names optimizer argument(s) {sorted(arguments)}: give the optimizer as a "
            f"spec string such as 'adamw'; got {spec!r}",
            param="space",
        )
    stages = [(t.strip(), *parse_spec(t, what="optimizer"), {}) for t in split_top_level(spec, "|")]
    names = [stage[1] for stage in stages]
    for key, value in arguments.items():
        stage, _, arg = key.rpartition(".")
        if stage and names.count(stage) != 1:
            raise ConfigError(
                f"space {key}: the optimizer {spec!r} has {names.count(stage) or 'no'} stage(s) "
                f"named {stage!r}; its stages are {', '.join(names)}",
                param="space",
            )
        stages[names.index(stage) if stage else 0][4][arg] = value
    return stages


def _dimension(field: str, text: str) -> Dimension:
    kind, args, kwargs = parse_spec(text, what="space")
    if kind == "choice" and args and not kwargs:
        return Choice(tuple(args))
    if kind in ("loguniform", "uniform") and len(args) == 2 and not kwargs:
        scale = "log" if kind == "loguniform" else "linear"
        bounds = Range(*args, scale=scale).check(field)
        if field not in INTEGER_FIELDS:
            return bounds
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(
                f"space entry {field}={text}: {field} takes integers, so a range over it "
                f"draws integers between integer bounds, e.g. {kind}({round(bounds.low)}, "
                f"{round(bounds.high)})",
                param="space",
            )
        return Integers(*args, scale=scale)
    raise ConfigError(
        f"space entry {field}={text}: the distributions are loguniform(low, high), "
        "uniform(low, high) and choice(v1, v2, ...)",
        param="space",
    )


class Sampler:
    """Trial values from a space: iterate for the next trial's ``{field: value}``; tell
    it the trial's validation metric (higher is better) with `tell`."""

    def __init__(self, points: Iterator[dict[str, Any]], size: int) -> None:
        self._points, self.size = points, size
        """How many trials it draws."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._points

    def tell(self, values: dict[str, Any], metric: float | None) -> None:
        """A finished trial's metric (``None``: failed); grid and random ignore it."""


def grid_points(space: dict[str, Dimension], points: int = 3) -> list[dict[str, Any]]:
    """Every combination, ranges at ``points`` evenly spaced values (ends included)."""
    points = check_int("points", points, low=2)
    axes = []
    for dim in space.values():
        if isinstance(dim, Choice):
            axes.append(dim.values)
        else:  # an integer range's points may round to one value: each once
            axes.append(tuple(dict.fromkeys(dim.value(u) for u in np.linspace(0.0, 1.0, points))))
    return [dict(zip(space, combo, strict=True)) for combo in itertools.product(*axes)]


def random_points(space: dict[str, Dimension], trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` scrambled Halton points mapped onto the space (quasi-random search)."""
    u = unit_points(check_int("trials", trials, low=1), len(space), seed=seed)
    dims = list(space.items())
    return [{k: dim.value(float(x)) for (k, dim), x in zip(dims, row, strict=True)} for row in u]


class TPESampler(Sampler):
    """Optuna's TPE through ask/tell: each trial is asked for after the metrics of the
    finished ones were told (maximised)."""

    def __init__(self, space: dict[str, Dimension], trials: int, seed: int) -> None:
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                "the tpe sampler is Optuna's: pip install 'jtricks[search]'", param="sampler"
            ) from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self._study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        self._space = {k: self._distribution(d) for k, d in space.items()}
        self._asked: list[tuple[dict[str, Any], Any]] = []
        trials = check_int("trials", trials, low=1)
        super().__init__(self._ask(trials), trials)

    def _distribution(self, dim: Dimension) -> Any:
        d = self._optuna.distributions
        if isinstance(dim, Choice):
            return d.CategoricalDistribution(dim.values)
        if isinstance(dim, Integers):
            return d.IntDistribution(dim.low, dim.high, log=dim.scale == "log")
        return d.FloatDistribution(dim.low, dim.high, log=dim.scale == "log")

    def _ask(self, trials: int) -> Iterator[dict[str, Any]]:
        for _ in range(trials):
            trial = self._study.ask(self._space)
            self._asked.append((trial.params, trial))
            yield dict(trial.params)

    def tell(self, values: dict[str, Any], metric: float | None) -> None:
        for params, trial in self._asked:
            if params == values:
                state = self._optuna.trial.TrialState
                if metric is None:
                    self._study.tell(trial, state=state.FAIL)
                else:
                    self._study.tell(trial, float(metric))
                self._asked.remove((params, trial))
                return


def check_grid(space: dict[str, Dimension], trials: int | None, points: int) -> None:
    """Refuse ``trials`` fewer than the grid's points: the grid runs in order, so the last
    values of its first setting would never be tried."""
    size = len(grid_points(space, points))
    if trials is not None and check_int("trials", trials, low=1) < size:
        raise ConfigError(
            f"trials={trials} would try the first {trials} of the grid's {size} points in "
            f"order, leaving the last values of {next(iter(space))!r} untried; give trials "
            f">= {size} (or none), fewer grid points, or method 'random'",
            param="trials",
        )


DEFAULT_TRIALS = 20
"""Trials of a random or TPE search when none are given."""


def make_sampler(
    name: str, space: dict[str, Dimension], trials: int | None, *, seed: int = 0, points: int = 3
) -> Sampler:
    """The sampler ``name`` (`SAMPLERS`) over ``space``: ``trials`` trials (``None``:
    `DEFAULT_TRIALS`), or for the grid all its combinations, ``points`` per range (the first
    ``trials`` of them, in order, where given: `check_grid` refuses that for a new search).

    Raises:
      ConfigError (``param="sampler"``): an unknown name.
    """
    if name == "grid":
        grid = grid_points(space, points)
        if trials is not None:
            grid = grid[: check_int("trials", trials, low=1)]
        return Sampler(iter(grid), len(grid))
    trials = DEFAULT_TRIALS if trials is None else trials
    if name == "random":
        return Sampler(iter(random_points(space, trials, seed)), trials)
    if name == "tpe":
        return TPESampler(space, trials, seed)
    raise ConfigError(
        f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}", param="sampler"
    )
