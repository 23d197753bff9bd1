"""Every module-level cache of `jtricks` (a `functools` cache or a jitted function) is
registered with `jtricks.caches`, and `jtricks.clear_caches()` empties each."""

from __future__ import annotations

import importlib
import pkgutil

import jax
import numpy as np
import optax
import pytest

import jtricks
from jtricks.caches import registered
from jtricks.data.stream import SequentialBatches
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.tasks import as_task
from jtricks.training import create_train_state, evaluate, fit
from jtricks.training.state import device_copy

OPTIONAL = {"tensorboardX", "grain", "sklearn", "kubernetes", "torch"}


def _modules():
    for info in pkgutil.walk_packages(jtricks.__path__, "jtricks."):
        if info.name.endswith("__main__"):  # runs the command when imported
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError as e:  # a module of an optional extra that is not installed
            assert e.name in OPTIONAL, e


def _caches() -> dict[str, object]:
    """Every functools cache and jitted function defined at a module's top level."""
    found = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if hasattr(obj, "cache_clear") or (
                hasattr(obj, "clear_cache") and hasattr(obj, "lower")
            ):
                found[f"{module.__name__}.{name}"] = obj
    return found


def _size(obj) -> int:
    if hasattr(obj, "cache_info"):
        return obj.cache_info().currsize
    return obj._cache_size()


def test_every_module_level_cache_is_registered():
    caches = _caches()
    assert len(caches) >= 10, sorted(caches)  # the finder finds them (13 when written)
    for name in ("jtricks.tasks._task_of_loss", "jtricks.training.state._copy_arrays"):
        assert name in caches
    missing = [
        name
        for name, obj in caches.items()
        if not registered(getattr(obj, "cache_clear", None) or obj.clear_cache)
    ]
    assert not missing, f"not registered with jtricks.caches: {missing}"


def test_clear_caches_empties_every_cache_that_a_run_filled():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 3, 40)
    model = build_model("mlp(features=(8,))", 3)
    state = create_train_state(model, optax.adam(1e-2), x, jax.random.key(0), ema_decay=0.9)
    state, _ = fit(device_copy(state), (x, y), batch_size=10, epochs=2, val_data=(x, y), chunk=2)
    stream = SequentialBatches((x, y), 10)
    state, _ = fit(state, stream, epochs=1, val_data=stream)
    evaluate(state, (x, y))
    caches = _caches()
    filled = {name for name, obj in caches.items() if _size(obj) > 0}
    for name in (
        "jtricks.training.compiled.compiled_functions",
        "jtricks.training.compiled.part_program",
        "jtricks.training.state._compiled_init",
        "jtricks.training.state._copy_arrays",
        "jtricks.tasks._task_of_loss",
        "jtricks.training.data_checks._traced_outputs",
    ):
        assert name in filled, (name, sorted(filled))
    jtricks.clear_caches()
    assert {name: _size(obj) for name, obj in caches.items() if _size(obj)} == {}


def test_the_models_output_shape_is_traced_once_per_model_and_shapes():
    """`model_outputs` keys its trace on the state's and the inputs' shapes: a new state
    of the same model, or more examples, trace nothing; other feature shapes are refused
    with the shapes named (the cache never hides the check)."""
    from jtricks.training.data_checks import _traced_outputs, model_outputs

    task, model = as_task("classification"), build_model("mlp(features=(8,))", 3)
    x = np.zeros((6, 5), np.float32)
    states = [create_train_state(model, optax.sgd(0.1), x, jax.random.key(i)) for i in (0, 1)]
    out = model_outputs(states[0], task, (x, np.zeros(6, int)), "training data")
    before = _traced_outputs.cache_info()
    again = model_outputs(states[1], task, (np.ones((60, 5), np.float32), np.zeros(60, int)), "x")
    after = _traced_outputs.cache_info()
    assert (out.shape, out.dtype) == (again.shape, again.dtype) == ((1, 3), np.float32)
    assert after.currsize == before.currsize and after.hits == before.hits + 1
    with pytest.raises(ConfigError, match=r"examples of shape \(7,\) do not fit"):
        model_outputs(states[1], task, (np.ones((6, 7), np.float32), np.zeros(6, int)), "data")


def test_a_jax_array_is_scanned_once(monkeypatch):
    """A dataset passed to `fit` call after call as JAX arrays is scanned for NaN and inf
    once (a JAX array is immutable; the scan of a 157 MB set took 80 ms per call), found
    bad or not; NumPy arrays, which can change in place, are scanned every time; the
    entry goes with its array and with `clear_caches`."""
    import gc

    import jax.numpy as jnp

    from jtricks.tasks import base

    scans = []
    real = jnp.isfinite
    monkeypatch.setattr(base.jnp, "isfinite", lambda a: scans.append(a.shape) or real(a))
    ok, bad = jnp.ones((4, 3)), jnp.ones((4, 3)).at[1, 2].set(jnp.nan)
    assert base.nonfinite(ok) is None and base.nonfinite(ok) is None and len(scans) == 1
    assert base.nonfinite(bad) == (1, (1, 2)) == base.nonfinite(bad) and len(scans) == 2
    host = np.ones((4, 3), np.float32)
    assert base.nonfinite(host) is None
    host[0, 0] = np.inf  # changed in place: found
    assert base.nonfinite(host) == (1, (0, 0))
    jtricks.clear_caches()
    assert base.nonfinite(ok) is None and len(scans) == 3
    key = id(ok)
    assert key in base._SCANNED._entries
    del ok
    gc.collect()
    assert key not in base._SCANNED._entries  # the entry went with its array


def test_device_labels_are_range_checked_once_per_array(monkeypatch):
    """The labels' range of a JAX array is read by one program once per array (a warm
    `fit` call on device data made two reductions and two host round trips for it);
    an out-of-range label is still refused, every time, and host labels are read anew."""
    import jax.numpy as jnp

    from jtricks.tasks import base

    task, calls = as_task("classification"), []
    real = base._min_max
    monkeypatch.setattr(base, "_min_max", lambda a: calls.append(a.shape) or real(a))

    def check(labels):
        base.check_integer_labels(task, "training data", "labels", labels, 3, "the model gives")

    good, bad = jnp.asarray([0, 2, 1, 2]), jnp.asarray([0, 3, -1, 2])
    check(good), check(good)
    assert calls == [(4,)]
    for _ in range(2):
        with pytest.raises(
            ConfigError, match=r"labels must lie in \[0, 2\].*got values in \[-1, 3\]"
        ):
            check(bad)
    assert calls == [(4,), (4,)]
    host = np.array([0, 1, 2])
    check(host)
    host[1] = 5  # changed in place: found
    with pytest.raises(ConfigError, match=r"got values in \[0, 5\]"):
        check(host)
    assert len(calls) == 2


def test_device_targets_are_copied_to_the_host_once_per_array(monkeypatch):
    """A regression's center, the balanced class weights and the balanced sampler read
    the training targets at every `fit` call: device-resident ones are copied to the host
    once per array (the guide: repeated calls on device data cost no transfers); the
    center is the float64 mean by hand; host targets changed in place are read anew."""
    import jax.numpy as jnp

    from jtricks.tasks import Regression
    from jtricks.training import data_checks

    copies = []
    real = data_checks._to_host
    monkeypatch.setattr(data_checks, "_to_host", lambda a: copies.append(a.shape) or real(a))
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(50, 3)).astype(np.float32), 3000 + rng.normal(size=(50, 2))
    y = jnp.asarray(t, jnp.float32)
    a, b = (data_checks.centered(Regression(), (x, y)) for _ in range(2))
    expect = np.asarray(y, np.float64).mean(0)
    assert a == b and np.allclose(a.center, expect, rtol=0, atol=1e-9) and copies == [(50, 2)]
    host = np.asarray(y).copy()
    assert data_checks.centered(Regression(), (x, host)).center == a.center
    host += 1.0  # changed in place: read anew
    assert np.allclose(data_checks.centered(Regression(), (x, host)).center, expect + 1.0)
    labels = jnp.asarray(rng.integers(0, 3, 60))
    model = build_model("mlp(features=(4,))", 3)
    state = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    xs = jnp.asarray(rng.normal(size=(60, 3)).astype(np.float32))
    for options in ({"class_weight": "balanced"}, {"sampler": "balanced"}) * 2:
        state = fit(state, (xs, labels), batch_size=20, steps=1, **options)[0]
    assert copies == [(50, 2), (60,)]
