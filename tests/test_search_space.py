"""Search spaces and samplers (T21): the one-line spec, grid / quasi-random / TPE trial
values against hand-computed points, and trial configs (optimizer arguments included)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest

from jtricks import TrainConfig
from jtricks.bench.search import Range, unit_points
from jtricks.errors import ConfigError
from jtricks.search import Choice, Integers, make_sampler, parse_space, trial_config
from jtricks.search.space import DEFAULT_TRIALS, check_grid

SPEC = (
    "lr=loguniform(1e-4, 1e-1), weight_decay=loguniform(1e-6, 1e-2), batch_size=choice(32, 64, 128)"
)


def test_the_spec_names_config_fields_and_optimizer_arguments():
    space = parse_space(SPEC + ", label_smoothing=uniform(0, 0.2)")
    assert list(space) == ["learning_rate", "weight_decay", "batch_size", "label_smoothing"]
    assert space["batch_size"] == Choice((32, 64, 128))
    assert (space["learning_rate"].low, space["learning_rate"].scale) == (1e-4, "log")
    assert space["label_smoothing"].scale == "linear"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lr", "expected NAME=loguniform"),
        ("lr=loguniform(1e-4, 1e-1), learning_rate=uniform(0, 1)", "twice"),
        ("lr=normal(0, 1)", "the distributions are"),
        ("lr=loguniform(0, 1)", "log-scale range needs low > 0"),
        ("lr=uniform(1, 0)", "empty or inverted"),
        ("", "space must be"),
    ],
)
def test_bad_specs_are_one_line(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_space(spec)


def test_grid_is_every_combination_with_the_ends():
    points = list(make_sampler("grid", parse_space(SPEC), 1000, points=3))
    assert len(points) == 3 * 3 * 3
    rates = sorted({p["learning_rate"] for p in points})
    np.testing.assert_allclose(rates, [1e-4, np.sqrt(1e-4 * 1e-1), 1e-1])
    assert {p["batch_size"] for p in points} == {32, 64, 128}
    whole = make_sampler("grid", parse_space(SPEC), None)
    assert whole.size == 27 and list(whole) == points  # no trials: the whole grid
    assert make_sampler("random", parse_space(SPEC), None).size == DEFAULT_TRIALS == 20
    with pytest.raises(ConfigError, match="trials=26 would try the first 26 of the grid's 27"):
        check_grid(parse_space(SPEC), 26, 3)  # in order: lr=1e-1, bs=128 never tried
    check_grid(parse_space(SPEC), 27, 3)
    assert list(make_sampler("grid", parse_space(SPEC), 26)) == points[:26]  # an old search's


def test_random_points_are_the_halton_points_mapped():
    space = parse_space(SPEC)
    got = list(make_sampler("random", space, 6, seed=3))
    u = unit_points(6, 3, seed=3)
    np.testing.assert_allclose([p["learning_rate"] for p in got], 1e-4 * 1000 ** u[:, 0])
    assert [p["batch_size"] for p in got] == [(32, 64, 128)[int(x * 3)] for x in u[:, 2]]
    assert got == list(make_sampler("random", space, 6, seed=3))


def test_tpe_asks_inside_the_space_and_learns_from_what_it_is_told():
    pytest.importorskip("optuna")
    space = parse_space("lr=loguniform(1e-4, 1e-1), batch_size=choice(32, 64)")
    runs = []
    for _ in range(2):
        sampler = make_sampler("tpe", space, 30, seed=0)
        seen = []
        for values in sampler:
            seen.append(values)
            score = -abs(np.log10(values["learning_rate"]) + 2.0)  # best at 1e-2
            sampler.tell(values, None if len(seen) == 3 else score)  # one failed trial
        runs.append(seen)
    assert runs[0] == runs[1]  # seeded
    rates = np.array([v["learning_rate"] for v in runs[0]])
    assert ((rates >= 1e-4) & (rates <= 1e-1)).all()
    early, late = np.abs(np.log10(rates[:10]) + 2), np.abs(np.log10(rates[-10:]) + 2)
    assert late.mean() < early.mean()  # it moved towards the optimum


def test_a_range_over_an_integer_setting_draws_integers_with_its_ends():
    """``batch_size=loguniform(16, 256)`` drew 39.79 and the trial was refused: a range
    over an integer train setting draws the nearest integers (a real setting, the lr,
    stays real between integer bounds)."""
    space = parse_space("batch_size=loguniform(16, 256), epochs=uniform(1, 2), lr=uniform(1, 2)")
    assert space["batch_size"] == Integers(16, 256, "log")
    assert type(space["learning_rate"]) is Range
    got = list(make_sampler("random", space, 8, seed=0))
    u = unit_points(8, 3, seed=0)
    assert [p["batch_size"] for p in got] == [math.floor(16 * 16**x + 0.5) for x in u[:, 0]]
    assert all(type(p["batch_size"]) is int and type(p["epochs"]) is int for p in got)
    assert all(type(p["learning_rate"]) is float for p in got)
    assert list(make_sampler("grid", parse_space("epochs=uniform(1, 2)"), 9)) == [
        {"epochs": 1},
        {"epochs": 2},  # 1.5 rounds to 2: the grid draws it once
    ]
    with pytest.raises(ConfigError, match=r"batch_size takes integers.*e\.g\. uniform\(16, 256\)"):
        parse_space("batch_size=uniform(16.5, 256)")
    if importlib.util.find_spec("optuna") is not None:  # TPE asks Optuna for integers
        sampler = make_sampler("tpe", parse_space("batch_size=loguniform(16, 256)"), 4, seed=0)
        drawn = []
        for values in sampler:
            drawn.append(values["batch_size"])
            sampler.tell(values, 1.0)
        assert all(type(b) is int and 16 <= b <= 256 for b in drawn)


def test_trial_config_sets_fields_and_optimizer_arguments():
    base = TrainConfig(optimizer="adamw | clip(1.0)")
    config = trial_config(base, {"learning_rate": 0.01, "weight_decay": 1e-4, "batch_size": 64})
    assert config.optimizer == "adamw(weight_decay=0.0001) | clip(1.0)"
    assert (config.learning_rate, config.batch_size) == (0.01, 64)
    config.validate()
    with pytest.raises(ConfigError, match="spec string"):
        trial_config(dataclasses.replace(base, optimizer={"name": "adam"}), {"b1": 0.8})
    base = TrainConfig(optimizer="optax.lion(b1=0.9) | l2(lam=1e-4) | lookahead")
    values = {"l2.lam": 1e-3, "lookahead.alpha": 0.7, "optax.lion.b2": 0.98, "b1": 0.8}
    config = trial_config(base, values)
    assert config.optimizer == "optax.lion(b1=0.8, b2=0.98) | l2(lam=0.001) | lookahead(alpha=0.7)"
    assert parse_space("l2.lam=loguniform(1e-5, 1e-2)")["l2.lam"].scale == "log"
    twice = dataclasses.replace(base, optimizer="adam | l2(lam=1e-4) | l2(lam=1e-3)")
    for name, stage, count in (("clip.max_norm", "clip", "no"), ("l2.lam", "l2", "2")):
        with pytest.raises(ConfigError, match=rf"has {count} stage\(s\) named '{stage}'"):
            trial_config(twice, {name: 0.1})
    with pytest.raises(ConfigError, match="sampler must be one of grid, random, tpe"):
        make_sampler("bayes", parse_space(SPEC), 3)
