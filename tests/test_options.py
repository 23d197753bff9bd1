"""`FitOptions`, the one object that says how `fit` trains: `fit`'s keyword arguments build
it, it checks every field when made, and a run's config maps to it in one place."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from jtricks import ConfigError, FitOptions, TrainConfig, fit
from jtricks.losses import mse
from jtricks.nn import build_model
from jtricks.tasks import Classification, Regression
from jtricks.training import create_train_state
from jtricks.training.state import device_copy


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 3, 40)


def _state(x):
    return create_train_state(
        build_model("mlp(features=(8,))", 3), optax.sgd(0.1), x, jax.random.key(0)
    )


def test_keyword_arguments_and_an_options_object_train_identically(data):
    state = _state(data[0])
    a, ha = fit(device_copy(state), data, batch_size=10, epochs=2, norms=False)
    options = FitOptions(batch_size=10, norms=False)
    b, hb = fit(state, data, options, epochs=2)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert ha.records[-1]["train_loss"] == hb.records[-1]["train_loss"]
    assert "train_grad_norm" not in hb.records[-1]


def test_keywords_replace_the_fields_of_given_options():
    base = FitOptions(batch_size=10, max_nonfinite=3)
    merged = FitOptions.build(base, {"max_nonfinite": 7})
    assert (merged.batch_size, merged.max_nonfinite) == (10, 7)
    assert base.max_nonfinite == 3  # frozen: a new object
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.batch_size = 3  # type: ignore[misc]


def test_numpy_scalars_are_the_numbers_they_are(data):
    """A grid from ``np.arange`` / ``np.logspace`` gives NumPy scalars: `fit` and the run's
    config take them (they were refused: "steps must be an integer; got np.int64(10)",
    "learning_rate must be a number; got np.float32(0.1)"); the config holds Python
    numbers, so config.json is written as for values typed by hand."""
    state, _ = fit(_state(data[0]), data, batch_size=np.int64(10), steps=np.int32(6))
    assert int(state.step) == 6 and FitOptions(batch_size=np.uint8(10)).batch_size == 10
    config = TrainConfig(learning_rate=np.float32(0.5), batch_size=np.int64(50))
    config.validate()
    assert type(config.batch_size) is int and type(config.learning_rate) is float
    assert config.learning_rate == float(np.float32(0.5)) and config == TrainConfig(
        learning_rate=0.5, batch_size=50
    )
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    with pytest.raises(ConfigError, match=r"must be an integer; got np\.True_"):
        FitOptions(batch_size=np.True_)


def test_a_loss_becomes_the_task_and_a_new_loss_replaces_it():
    options = FitOptions(loss_fn=mse)
    assert isinstance(options.task, Regression) and options.loss_fn is None
    assert isinstance(FitOptions(task="classification").task, Classification)
    assert isinstance(
        FitOptions.build(FitOptions(task="classification"), {"loss_fn": mse}).task, Regression
    )


def test_an_augmentation_spec_trains_as_the_pipeline_it_names(data):
    """``augment="shift(1) | noise(0.1)"`` (as the CLI's ``--augment``) equals the built
    pipeline, and one spec is one object: repeated calls share their programs."""
    from jtricks.data.augment import compose, noise, shift

    state = _state(data[0])
    spec = "shift(1) | noise(0.1)"
    a, _ = fit(device_copy(state), data, batch_size=10, epochs=2, augment=spec)
    b, _ = fit(state, data, batch_size=10, epochs=2, augment=compose(shift(1), noise(0.1)))
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert FitOptions(augment=spec).augment is FitOptions(augment=spec).augment


@pytest.mark.parametrize(
    ("settings", "param", "words"),
    [
        ({"batch_sise": 10}, "batch_sise", "did you mean: batch_size"),
        (
            {"progress": True},
            "progress",
            r"fit draws progress through a reporter: fit\(\.\.\., rep",
        ),
        ({"batch_size": 0}, "batch_size", "batch_size"),
        ({"max_nonfinite": 2.5}, "max_nonfinite", "integer"),
        ({"precision": "fp8"}, "precision", "float32, bf16"),
        ({"eval_params": "best"}, "eval_params", "auto, train, ema"),
        ({"mix": ("mixdown", 0.2)}, "mix", "'mixup' | 'cutmix'"),
        ({"augment": 3}, "augment", "a function \\(key, x\\) -> x or a spec"),
        ({"augment": "shfit(1)"}, "augment", "did you mean: shift"),
    ],
)
def test_bad_options_name_the_argument_and_what_is_allowed(data, settings, param, words):
    with pytest.raises(ConfigError, match=words) as e:
        fit(_state(data[0]), data, epochs=1, **settings)
    assert e.value.param == param


def test_the_config_maps_to_fit_options_in_one_place():
    """Single runs and ensembles get their options from the same function: every field
    that reaches `fit` comes from the config, for either path."""
    from jtricks.run.build import Build
    from jtricks.run.options import fit_options

    config = TrainConfig(max_nonfinite=5, batch_size=16, chunk=7, log_every_steps=3)
    key = jax.random.key(0)
    b = Build(Classification(), None, None, 100, False, key, key, key)
    single = fit_options(config, b, None)
    ensemble = fit_options(dataclasses.replace(config, ensemble=4), b, None)
    assert single.max_nonfinite == ensemble.max_nonfinite == 5
    assert single.batch_size == ensemble.batch_size == 16
    assert (single.chunk, single.log_every_steps) == (7, 3)
    assert (single.mesh, ensemble.mesh) == ("auto", None)
