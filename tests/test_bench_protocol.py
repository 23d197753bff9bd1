"""The AlgoPerf arithmetic and rules of the bench protocol, against hand-made tables and a
fake clock: median over studies of the fastest trial, performance profiles and their
score, geometric-mean speedup, quasi-random trials and their seeds, and the timing rules
(compilation counted, evaluation untimed, ``max_runtime``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jtricks.bench.protocol import reaches, timed_trial
from jtricks.bench.scoring import (
    geometric_mean_speedup,
    performance_profile,
    performance_ratios,
    profile_score,
    workload_time,
)
from jtricks.bench.search import (
    DEFAULT_SPACE,
    Range,
    make_studies,
    search_space,
    target_seeds,
    unit_points,
)
from jtricks.errors import ConfigError

INF = math.inf
# studies x trials of time-to-target, per workload and optimizer
STUDIES = {
    "A": {"X": [[10, 12], [8, INF], [9, 11]], "Y": [[20], [18], [INF]], "Z": [[INF]] * 3},
    "B": {"X": [[5], [7], [6]], "Y": [[3], [4], [5]], "Z": [[12], [12], [12]]},
    "C": {"X": [[INF]] * 3, "Y": [[30], [40], [50]], "Z": [[35], [30], [45]]},
}


def test_workload_time_is_the_median_over_studies_of_the_fastest_trial():
    times = {w: {o: workload_time(s) for o, s in row.items()} for w, row in STUDIES.items()}
    # by hand: A/X study minima 10, 8, 9 -> 9; A/Y 20, 18, inf -> 20; ...
    assert times == {
        "A": {"X": 9, "Y": 20, "Z": INF},
        "B": {"X": 6, "Y": 4, "Z": 12},
        "C": {"X": INF, "Y": 40, "Z": 35},
    }
    assert workload_time([[1], [3]]) == 2 and workload_time([[1], [INF]]) == INF


def test_profiles_score_and_speedup_match_the_hand_computation():
    times = {w: {o: workload_time(s) for o, s in row.items()} for w, row in STUDIES.items()}
    ratios = performance_ratios(times)
    assert ratios["A"] == pytest.approx({"X": 1.0, "Y": 20 / 9, "Z": INF})
    assert ratios["C"] == pytest.approx({"X": INF, "Y": 40 / 35, "Z": 1.0})
    # each workload adds (4 - max(1, r)) / (3 workloads * (4 - 1)) where r <= 4
    expect = {
        "X": (3 + 2.5 + 0) / 9,
        "Y": ((4 - 20 / 9) + 3 + (4 - 40 / 35)) / 9,
        "Z": (0 + 1 + 3) / 9,
    }
    assert profile_score(ratios, 4.0) == pytest.approx(expect)
    profile = performance_profile(ratios, [1.5])
    assert {k: v[0] for k, v in profile.items()} == pytest.approx(
        {"X": 2 / 3, "Y": 2 / 3, "Z": 1 / 3}
    )
    speed = geometric_mean_speedup(times, baseline="X")
    assert speed["Y"]["speedup"] == pytest.approx(math.sqrt((9 / 20) * (6 / 4)))
    assert speed["Y"]["workloads"] == 2
    assert speed["Z"]["speedup"] == pytest.approx(0.5)  # only B: both reached there
    assert speed["Z"]["workloads"] == 1
    assert speed["X"]["speedup"] == pytest.approx(1.0)


def test_trials_are_reproducible_in_range_and_their_seeds_never_repeat():
    a = make_studies(DEFAULT_SPACE, 4, 3, seed=7)
    assert a == make_studies(DEFAULT_SPACE, 4, 3, seed=7)
    assert a != make_studies(DEFAULT_SPACE, 4, 3, seed=8)
    assert [t.hparams for t in a[0]] != [t.hparams for t in a[1]]  # independent studies
    for study in a:
        for trial in study:
            for name, r in DEFAULT_SPACE.items():
                assert r.low <= trial.hparams[name] <= r.high
    seeds = [t.seed for study in a for t in study]
    targets = target_seeds(12, seed=7)
    assert len(set(seeds)) == 12 and not set(seeds) & set(targets)
    assert not set(seeds) & {t.seed for s in make_studies(DEFAULT_SPACE, 4, 3, seed=8) for t in s}


@pytest.mark.parametrize("method", ["halton", "sobol"])
def test_quasi_random_points_fill_every_stratum(method):
    u = unit_points(8, 2, seed=3, method=method)
    # a (scrambled) base-2 low-discrepancy sequence puts one of its first 8 points in each
    # eighth of the first axis
    assert sorted(np.floor(u[:, 0] * 8).astype(int)) == list(range(8))
    assert Range(1e-4, 1e-2).value(0.5) == pytest.approx(1e-3)  # log scale: the geometric middle
    assert Range(0.0, 0.2, "linear").value(0.5) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "must map hyper-parameter names"),
        ({"learning_rate": {"low": 1e-2, "high": 1e-2}}, "'learning_rate': the range"),
        ({"learning_rate": {"low": 1e-1, "high": 1e-3}}, "empty or inverted"),
        ({"weight_decay": {"low": 0.0, "high": 0.1}}, "log-scale range needs low > 0"),
        ({"b1": {"low": 0.8, "high": 0.9, "scale": "cubic"}}, "scale must be one of log, linear"),
        ({"b1": {"low": 0.8}}, "must have low, high"),
        ({"b1": 0.9}, "must be a range"),
    ],
)
def test_bad_search_spaces_are_refused_by_name(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        search_space(spec)
    assert e.value.param == "search_space"


class FakeClock:
    """Seconds that advance only when the fake training or evaluation says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trial(metrics, *, compile_s=5.0, step_s=0.5, eval_s=100.0, **kw):
    clock, calls, values = FakeClock(), [], iter(metrics)

    def train(n):
        clock.now += (compile_s if not calls else 0.0) + n * step_s
        calls.append(n)

    def evaluate():
        clock.now += eval_s  # evaluation takes long and must not count
        return next(values)

    kw = {"eval_period": 10, "total_steps": 100, "max_runtime": 1e9, **kw}
    return timed_trial(train, evaluate, reaches("accuracy", 0.9), clock=clock, **kw), calls


def test_compilation_counts_and_evaluation_does_not():
    result, calls = _trial([0.5, 0.8, 0.95, 0.99])
    # 5 s to compile + 3 chunks of 10 steps at 0.5 s; 3 evaluations of 100 s excluded
    assert result.time_to_target == pytest.approx(5.0 + 30 * 0.5)
    assert result.steps_to_target == 30 and calls == [10, 10, 10]
    assert result.eval_time == pytest.approx(300.0)
    assert [c["time"] for c in result.curve] == pytest.approx([10.0, 15.0, 20.0])


def test_max_runtime_stops_an_unreached_trial():
    result, calls = _trial([0.1] * 10, max_runtime=12.0)
    assert result.time_to_target == INF and result.steps_to_target is None
    assert calls == [10, 10]  # 10 s, then 15 s > 12 s: no third chunk
    late, _ = _trial([0.1, 0.95], max_runtime=12.0)  # reached, but after max_runtime
    assert late.time_to_target == INF
    short, calls = _trial([0.1, 0.2, 0.95], total_steps=25)
    assert calls == [10, 10, 5] and short.steps_to_target == 25  # the last chunk is partial
    assert reaches("loss", 0.3)(0.2) and not reaches("loss", 0.3)(float("nan"))


def test_the_nadamw_baseline_warms_up_then_decays_on_a_cosine():
    import jax
    import jax.numpy as jnp
    import optax

    from jtricks.bench.algorithms import build_algorithm, warmup_cosine

    hp = {"learning_rate": 0.1, "one_minus_b1": 0.05, "weight_decay": 0.01, "warmup_fraction": 0.2}
    total, warm = 50, 10

    def by_hand(t):  # the formula, in Python floats
        t = float(t)
        if t <= warm:
            return 0.1 * t / warm
        return 0.1 * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))

    tx = build_algorithm("nadamw", hp, total)
    # traced in every hyper-parameter, it equals optax's schedule for fixed values
    lib = optax.warmup_cosine_decay_schedule(0.0, 0.1, warm, total, 0.0)
    traced = jax.jit(lambda hp, t: warmup_cosine(hp, total)(t))
    for t in range(total + 1):
        np.testing.assert_allclose(traced(hp, t), lib(t), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(traced(hp, t), by_hand(t), rtol=1e-5, atol=1e-9)
    ref = optax.nadamw(by_hand, b1=0.95, b2=0.999, weight_decay=0.01)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    s, r = tx.init(params), ref.init(params)
    for step in range(total):
        g = {"w": jnp.array([0.3, -0.1, 0.2]) * (1 + step % 3)}
        u, s = tx.update(g, s, params)
        v, r = ref.update(g, r, params)
        np.testing.assert_allclose(u["w"], v["w"], rtol=1e-5, atol=1e-7)
