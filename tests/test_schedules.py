"""Learning-rate schedules against their formulas, the epoch-based specs, and reduce-on-plateau."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.optim import build_optimizer, build_schedule, current_learning_rate
from jtricks.optim import schedules as S
from jtricks.optim.schedules import Plateau
from jtricks.training import ReduceLROnPlateau, TrainState

T = np.arange(0, 200)


def _values(schedule):
    return np.array([float(schedule(t)) for t in T])


@pytest.mark.parametrize(
    ("schedule", "formula"),
    [
        (S.constant(0.3), lambda t: 0.3 + 0 * t),
        (S.per_epoch(0.1, 0.98, 10), lambda t: 0.1 * 0.98 ** np.floor(t / 10)),
        (S.exponential(0.1, 0.05, 10), lambda t: 0.1 * np.exp(-0.05 * t / 10)),
        (S.exponential(0.1, 0.01), lambda t: 0.1 * np.exp(-0.01 * t)),
        (
            S.step_decay(0.1, [50, 150], 0.1),
            lambda t: 0.1 * 0.1 ** ((t >= 50).astype(int) + (t >= 150)),
        ),
        (  # given out of order and twice: the formula counts every boundary passed
            S.step_decay(0.1, [150, 50, 150], 0.5),
            lambda t: 0.1 * 0.5 ** ((t >= 50).astype(int) + 2 * (t >= 150)),
        ),
        (S.linear_warmup(0.1, 20), lambda t: np.where(t < 20, 0.1 * t / 20, 0.1)),
        (S.cosine(0.1, 200, 0.01), lambda t: 0.01 + 0.09 * (1 + np.cos(np.pi * t / 200)) / 2),
        (
            S.warmup_cosine(0.1, 20, 200, 0.0),
            lambda t: np.where(t < 20, 0.1 * t / 20, 0.05 * (1 + np.cos(np.pi * (t - 20) / 180))),
        ),
    ],
    ids=[
        "constant",
        "per_epoch",
        "exponential_epochs",
        "exponential_steps",
        "step",
        "step_repeated",
        "warmup",
        "cosine",
        "warmup_cosine",
    ],
)
def test_schedule_matches_formula(schedule, formula):
    np.testing.assert_allclose(
        _values(schedule), formula(T.astype(np.float64)), rtol=1e-5, atol=1e-8
    )


def test_one_cycle_shape():
    v = _values(S.one_cycle(0.1, 200, pct_start=0.3, div_factor=25, final_div_factor=1e4))
    assert v[0] == pytest.approx(0.1 / 25, rel=1e-5)
    assert v.argmax() == 60 and v.max() == pytest.approx(0.1, rel=1e-5)
    assert float(S.one_cycle(0.1, 200)(200)) == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)


def test_specs_convert_epochs_to_steps():
    spe, total = 10, 100
    last = build_schedule("step(epochs=(9.9,))", 1.0, steps_per_epoch=spe, total_steps=total)
    assert [float(last(t)) for t in (98, 99)] == [1.0, pytest.approx(0.1)]  # the last step drops
    warm = build_schedule("warmup(epochs=9.9)", 1.0, steps_per_epoch=spe, total_steps=total)
    assert [float(warm(t)) for t in (98, 99)] == [pytest.approx(98 / 99), 1.0]  # peak at the end
    cos = build_schedule(
        "warmup_cosine(warmup_epochs=9.9)", 1.0, steps_per_epoch=spe, total_steps=total
    )
    assert [float(cos(t)) for t in (99, 100)] == [1.0, 0.0]  # peak, then one step of decay
    with pytest.raises(ConfigError, match="warmup_steps"):  # optax would divide by no decay
        S.warmup_cosine(1.0, total, total)
    np.testing.assert_allclose(
        _values(
            build_schedule(
                "step(epochs=(5,), factor=0.5)", 0.2, steps_per_epoch=spe, total_steps=total
            )
        ),
        _values(S.step_decay(0.2, [50], 0.5)),
    )
    np.testing.assert_allclose(
        _values(build_schedule("per_epoch", 0.2, steps_per_epoch=spe, total_steps=total)),
        _values(S.per_epoch(0.2, 0.98, spe)),
    )
    np.testing.assert_allclose(
        _values(
            build_schedule(
                "warmup_cosine(warmup_epochs=2)", 0.2, steps_per_epoch=spe, total_steps=total
            )
        ),
        _values(S.warmup_cosine(0.2, 20, 100)),
    )
    p = build_schedule(
        "plateau(factor=0.2, patience=3)", 0.2, steps_per_epoch=spe, total_steps=total
    )
    assert p == Plateau(factor=0.2, patience=3)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "linear",
            "valid schedules are: constant, cosine, exponential, one_cycle, per_epoch, plateau, step",
        ),
        ("per_epoch(factor=1.5)", "factor"),
        ("step", "needs epochs"),
        ("step(epochs=(10, 20))", "first drop, after epoch 10, lies at or past the run's end"),
        ("cosine(end_factor=2)", "end_factor"),
        ("plateau(patience=-1)", "patience"),
        ("plateau(mode='up')", "mode"),
        ("one_cycle(pct_start=1.5)", "pct_start"),
        ("warmup(epochs=-1)", "epochs"),
        ("warmup(epochs=10)", "warm-up's end, after epoch 10, lies at or past the run's end"),
        ("warmup_cosine(warmup_epochs=12)", "so the rate would never decay"),
        ("exponential(speed=1)", "valid arguments are: rate"),
    ],
)
def test_bad_schedule_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule(spec, 0.1, steps_per_epoch=10, total_steps=100)


def test_a_rebuilt_run_builds_its_ends_as_they_were():
    """``within_run=False`` (a run folder rebuilt to load or resume) builds what a new run
    refuses, as the schedule it trained with: a warm-up still rising at the end."""
    spec, length = "warmup(epochs=12)", dict(steps_per_epoch=10, total_steps=100)
    with pytest.raises(ConfigError, match="warm-up's end, after epoch 12"):
        build_schedule(spec, 0.1, **length)
    schedule = build_schedule(spec, 0.1, **length, within_run=False)
    np.testing.assert_allclose(float(schedule(99)), 0.1 * 99 / 120, rtol=1e-6)  # optax: t / T


def _state(plateau=True):
    params = {"w": jnp.ones(2)}
    tx = build_optimizer("sgd", 0.4, plateau=plateau)
    return TrainState(
        step=jnp.int32(0),
        apply_fn=None,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats={},
        key=None,
    )


def test_reduce_on_plateau_by_hand():
    cb = ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.01, min_scale=0.2)
    state = _state()
    losses = [1.0, 0.9, 0.895, 0.893, 0.80, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91]
    # improvement needs a drop of more than 0.01: epochs 3, 4 are plateau -> halve; 5 improves;
    # 6, 7 -> halve; 8, 9 -> halve would give 0.125 < min_scale -> 0.2; then stays at the floor
    expect = [0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1, 0.08, 0.08, 0.08, 0.08]
    got = []
    for loss in losses:
        out = cb.on_epoch_end({"val_loss": loss}, state)
        state = out if out is not None else state
        got.append(float(current_learning_rate(state.opt_state)))
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_reduce_on_plateau_max_mode_and_errors():
    cb = ReduceLROnPlateau(factor=0.1, patience=1, mode="max", monitor="val_accuracy")
    state = _state()
    assert cb.on_epoch_end({"val_accuracy": 0.5}, state) is None
    new = cb.on_epoch_end({"val_accuracy": 0.4}, state)
    assert float(current_learning_rate(new.opt_state)) == pytest.approx(0.04)
    with pytest.raises(ConfigError, match="monitors 'val_loss'"):
        ReduceLROnPlateau().on_epoch_end({"train_loss": 1.0}, state)
    cb = ReduceLROnPlateau(patience=0)
    cb.on_epoch_end({"val_loss": 1.0}, _state(plateau=False))
    with pytest.raises(ConfigError, match="plateau=True"):
        cb.on_epoch_end({"val_loss": 2.0}, _state(plateau=False))
    for kwargs in ({"factor": 1.0}, {"patience": -1}, {"mode": "up"}, {"min_scale": 2.0}):
        with pytest.raises(ConfigError):
            ReduceLROnPlateau(**kwargs)
    assert math.isinf(ReduceLROnPlateau().best)
    assert optax.tree_utils.tree_get(_state().opt_state, "plateau_scale") == 1.0


def test_step_schedules_need_no_run_length_and_whole_run_ones_say_so():
    """Durations default to steps (steps_per_epoch=1); only the whole-run schedules need
    total_steps, and say so without it."""
    got = build_schedule("exponential(rate=0.5)", 0.1)
    np.testing.assert_allclose(float(got(4)), 0.1 * np.exp(-0.5 * 4), rtol=1e-6)
    np.testing.assert_allclose(float(build_schedule("per_epoch(factor=0.5)", 0.1)(3)), 0.0125)
    for name in ("cosine", "warmup_cosine", "one_cycle"):
        with pytest.raises(
            ConfigError, match=f"the {name} schedule runs over the whole run: give total_steps"
        ):
            build_schedule(name, 0.1)
    np.testing.assert_allclose(
        float(build_schedule("cosine", 0.1, total_steps=100)(50)), 0.05, rtol=1e-6
    )
