"""Any optax / optax.contrib / user optimizer by name, the extra-arguments update contract,
and optimizer states that alias the parameters."""

from __future__ import annotations

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.optim import build_optimizer, contract, current_learning_rate, fused
from jtricks.spec import parse_spec, split_top_level

PARAMS = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)}
PARAMS["b"] = jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)


def loss(params):
    return 0.5 * jnp.sum(params["w"] ** 2) + jnp.sum((params["b"] - 0.3) ** 2)


@jax.jit
def _value_and_grad(params):
    return jax.value_and_grad(loss)(params)


def _step(tx, steps: int = 1):
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(steps):
        value, grads = _value_and_grad(params)
        updates, state = contract.update(tx, grads, state, params, value=value, value_fn=loss)
        params = optax.apply_updates(params, updates)
    return params


NAMES = [
    "optax.lion(b1=0.95)",
    "optax.lamb",
    "optax.lars",
    "optax.nadamw",
    "optax.adafactor",
    "optax.lbfgs",
    "optax.polyak_sgd",
    "contrib.muon",
    "contrib.schedule_free_adamw",
    "contrib.prodigy",
    "contrib.dadapt_adamw",
    "contrib.adopt",
    "contrib.ademamix",
    "contrib.sophia",
    "optax.contrib.momo",
]


def _own(spec: str, learning_rate: float) -> optax.GradientTransformation:
    """The optimizer a spec names, built directly by its optax factory (the second path):
    the rate as ``learning_rate``, or as its first parameter when it has none."""
    from jtricks.optim import external

    name, args, kwargs = parse_spec(spec)
    factory = external.resolve(name)
    params = list(inspect.signature(factory).parameters)
    rate = "learning_rate" if "learning_rate" in params else params[0]
    # the objective renamed for the optimizers that read it as obj_fn (sophia)
    return external.check_transformation(factory(*args, **{rate: learning_rate}, **kwargs), name)


@pytest.mark.parametrize("spec", NAMES)
def test_every_listed_optimizer_builds_from_a_spec_and_steps_as_optax_does(spec):
    """Three steps through `build_optimizer` (the rate injected into the state) equal three
    steps of the optax factory called directly, and the parameters moved."""
    tx = build_optimizer(spec, 1e-2)
    new = _step(tx, steps=3)  # ADOPT's first step only initialises its second moment
    want = _step(_own(spec, 1e-2), steps=3)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = max(
        float(jnp.max(jnp.abs(n - p)))
        for n, p in zip(jax.tree.leaves(new), jax.tree.leaves(PARAMS), strict=True)
    )
    assert moved > 0
    assert float(current_learning_rate(tx.init(PARAMS))) == pytest.approx(1e-2)  # injected


def test_a_spec_runs_the_very_optax_optimizer():
    ours = _step(build_optimizer("optax.lion(lr=3e-3, b1=0.8) | clip_global_norm(1.0)", 1.0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.lion(3e-3, b1=0.8))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(_step(tx)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_polyak_sgd_gets_the_value_by_hand_formula():
    """Polyak step size: min(f(x) / ||g||^2, max_lr), f_min = 0."""
    value, grads = _value_and_grad(PARAMS)
    g2 = float(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    new = _step(build_optimizer("optax.polyak_sgd", 10.0))
    step = min(float(value) / g2, 10.0)
    for n, p, g in zip(*(jax.tree.leaves(t) for t in (new, PARAMS, grads)), strict=True):
        np.testing.assert_allclose(n, p - step * g, rtol=1e-5, atol=1e-7)


def test_a_python_callable_is_a_spec():
    tx = build_optimizer(lambda lr: optax.sgd(lr, momentum=0.5), 0.1)
    _, grads = _value_and_grad(PARAMS)
    new = _step(tx)
    for n, p, g in zip(*(jax.tree.leaves(t) for t in (new, PARAMS, grads)), strict=True):
        np.testing.assert_allclose(n, p - 0.1 * g, rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("optax.lino", "optax has no optimizer factory 'lino'; did you mean: lion"),
        ("contrib.muonn", "did you mean: muon"),
        (
            "optax.lion(bogus=1)",
            "unexpected keyword argument 'bogus'; valid arguments are: learning_rate, b1",
        ),
        ("no_such_module:make", "cannot import module 'no_such_module'"),
        ("json:dumps", "returned str, not an optax GradientTransformation"),
        ("adamm", "did you mean: adam"),
        # callables of optax that take no rate: it would land in their first parameter
        ("optax.scale_by_adam", "not an optimizer that takes a learning rate .its parameters: b1"),
        ("optax.scale", "not an optimizer that takes a learning rate .its parameters: step_size"),
        ("contrib.reduce_on_plateau", "parameters: factor, .*use --schedule plateau"),
        ("contrib.sam", "parameters: optimizer, adv_optimizer.*module:factory"),
    ],
)
def test_bad_optimizer_names_and_arguments(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer(spec)


def test_spec_grammar_dotted_names_import_paths_and_top_level_commas():
    assert parse_spec("optax.contrib.muon(ns_steps=3)") == (
        "optax.contrib.muon",
        (),
        {"ns_steps": 3},
    )
    assert parse_spec("pkg.mod:make(lr=1e-3)") == ("pkg.mod:make", (), {"lr": 1e-3})
    assert split_top_level("optax.lion(b1=0.9, b2=0.99), sgd", ",") == [
        "optax.lion(b1=0.9, b2=0.99)",
        "sgd",
    ]


@pytest.fixture(scope="module")
def data():
    from jtricks.data import synthetic

    return synthetic(num_train=120, num_test=40, shape=(8,), num_classes=3, noise=0.3, seed=0)


def _fit(tx, data, epochs=3):
    from jtricks.nn import build_model
    from jtricks.training import create_train_state, evaluate, fit

    model = build_model("mlp(features=(8,))", 3)
    state = create_train_state(model, tx, data.x_train, jax.random.key(0))
    before = evaluate(state, (data.x_train, data.y_train))["loss"]
    state, _ = fit(
        state,
        (data.x_train, data.y_train),
        batch_size=40,
        epochs=epochs,
        data_key=jax.random.key(1),
    )
    return before, evaluate(state, (data.x_train, data.y_train))["loss"]


@pytest.mark.parametrize(
    "tx",
    [
        pytest.param(lambda: optax.contrib.prodigy(1.0), id="prodigy-raw"),
        pytest.param(lambda: build_optimizer("optax.lbfgs", 1.0), id="lbfgs"),
        pytest.param(lambda: build_optimizer("optax.polyak_sgd", 1.0), id="polyak_sgd"),
        pytest.param(
            lambda: build_optimizer("contrib.schedule_free_adamw", 1e-2), id="schedule_free_adamw"
        ),
        pytest.param(lambda: fused(optax.contrib.prodigy(1.0)), id="prodigy-fused"),
    ],
)
def test_optimizers_that_need_more_train_in_fit(tx, data):
    """prodigy keeps the parameter arrays in its state (donated twice before); L-BFGS and
    Polyak SGD read the loss (and L-BFGS the loss function) from the train step."""
    before, after = _fit(tx(), data)
    assert np.isfinite(after) and after < before


@pytest.mark.parametrize("opaque", [False, True])
def test_sam_takes_only_the_keywords_it_names_and_its_gradients(opaque):
    """`optax.contrib.sam` names its one keyword (``grad_fn``, and no ``**kwargs``): the
    contract passes only that, the loss's gradient, so SAM equals its hand-written use."""
    tx = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), sync_period=2, opaque_mode=opaque)
    params, state, want = PARAMS, tx.init(PARAMS), PARAMS
    want_state = tx.init(PARAMS)
    grad_fn = lambda p, i: jax.grad(loss)(p)  # noqa: E731
    for _ in range(4):
        value, grads = _value_and_grad(params)
        updates, state = contract.update(tx, grads, state, params, value=value, value_fn=loss)
        params = optax.apply_updates(params, updates)
        extra = {"grad_fn": grad_fn} if opaque else {}
        updates, want_state = tx.update(jax.grad(loss)(want), want_state, want, **extra)
        want = optax.apply_updates(want, updates)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert not np.allclose(params["w"], PARAMS["w"])


def test_prodigy_state_that_aliases_the_params_trains_as_an_ensemble(data):
    from jtricks.nn import build_model
    from jtricks.training.ensemble import create_ensemble, fit_ensemble

    tx = optax.contrib.prodigy(1.0)
    states = create_ensemble(
        build_model("mlp(features=(8,))", 3),
        tx,
        data.x_train,
        jax.random.split(jax.random.key(0), 2),
    )
    states, _ = fit_ensemble(
        states, (data.x_train, data.y_train), batch_size=40, epochs=1, data_key=jax.random.key(1)
    )
    assert bool(jnp.all(jnp.isfinite(states.params["Dense_0"]["kernel"])))


USER_MODULE = """
import optax

def make(learning_rate, momentum=0.9):
    return optax.sgd(learning_rate, momentum=momentum)

def not_a_transformation(learning_rate):
    return 3
"""


def test_user_optimizer_by_import_path_from_the_cli(tmp_path, monkeypatch, capsys):
    from jtricks.cli import main

    (tmp_path / "my_opt_module.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    tiny = [
        "--dataset",
        "synthetic(num_train=120, num_test=40, shape=(8,), num_classes=3)",
        "--model",
        "mlp(features=(8,))",
    ]
    out = tmp_path / "run"
    args = [
        "train",
        *tiny,
        "--epochs",
        "1",
        "--no-progress",
        "--optimizer",
        "my_opt_module:make(momentum=0.5)",
    ]
    assert main([*args, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "my_opt_module:make(momentum=0.5)" in json.dumps(config)
    for bad, message in [
        ("my_opt_module:missing", "my_opt_module has no optimizer factory 'missing'"),
        ("my_opt_module:not_a_transformation", "not an optax GradientTransformation"),
        ("nowhere_module:make", "cannot import module 'nowhere_module'"),
        ("optax.lion(bogus=1)", "unexpected keyword argument 'bogus'"),
        ("optax.lino", "did you mean: lion"),
    ]:
        capsys.readouterr()
        bad_out = tmp_path / "bad"
        status = main(["train", *tiny, "--epochs", "1", "--optimizer", bad, "--out", str(bad_out)])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err
        assert not bad_out.exists()


def nesterov(learning_rate):
    return optax.sgd(learning_rate, momentum=0.9, nesterov=True)


@pytest.fixture(scope="module")
def tiny_workload():
    from dataclasses import replace

    from jtricks.bench.workloads import select

    (w,) = select("quick", ["regression_mlp"])
    return replace(w, total_steps=40, eval_period=20, max_runtime=60.0)


def test_bench_takes_any_optimizer_spec_and_callables_named_or_labelled(tiny_workload):
    """`run_algoperf` with an optax spec, a named callable and a labelled lambda: results
    keyed by labels, strict JSON."""
    from jtricks.bench import jsonable, labelled_algorithms, run_algoperf

    spec = "optax.lion(b1=0.95)"
    targets = {tiny_workload.name: {"metric": "mse", "validation": 0.05, "test": 0.05}}
    algorithms = {spec: spec, "nesterov": nesterov, "plain": lambda lr: optax.sgd(lr)}
    res = run_algoperf([tiny_workload], targets, algorithms=algorithms, num_trials=1, num_studies=1)
    assert res["algorithms"] == [spec, "nesterov", "plain"]
    assert {t["algorithm"] for t in res["trials"]} == {spec, "nesterov", "plain"}
    json.dumps(jsonable(res), allow_nan=False)  # no function object anywhere
    assert labelled_algorithms([nesterov, "adamw"]) == {"nesterov": nesterov, "adamw": "adamw"}
    with pytest.raises(ConfigError, match="has no name for the results"):
        labelled_algorithms([lambda lr: optax.sgd(lr)])
    with pytest.raises(ConfigError, match="labels repeat"):
        labelled_algorithms(["sgd", "sgd"])


def test_bench_refuses_a_misspelt_optax_name(tmp_path, capsys):
    from jtricks.cli import main

    bad = ["bench", "--workloads", "regression_mlp", "--algorithms", "optax.lino"]
    assert main([*bad, "--out", str(tmp_path / "b2")]) == 2
    assert "did you mean: lion" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


@pytest.mark.parametrize(
    ("name", "meant"),
    [("lion", "optax.lion"), ("lbfgs", "optax.lbfgs"), ("muon", "contrib.muon")],
)
def test_a_bare_optax_name_suggests_the_prefixed_one(name, meant):
    with pytest.raises(
        ConfigError, match=rf"unknown optimizer or transform '{name}' \(did you mean '{meant}'\?"
    ):
        build_optimizer(name)
    assert isinstance(build_optimizer(meant, 1e-3), optax.GradientTransformation)


def test_create_train_state_takes_an_optimizer_spec():
    from jtricks.nn import MLP
    from jtricks.training import create_train_state, fit

    spec = "adamw(lr=1e-2, weight_decay=0.01) | clip_global_norm(1.0)"
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype(np.float32), rng.integers(0, 3, 16)
    model, key = MLP(num_classes=3, features=(4,)), jax.random.key(0)
    by_name = create_train_state(model, spec, x, key)
    built = create_train_state(model, build_optimizer(spec), x, key)
    assert by_name.tx == built.tx
    trained = [fit(s, (x, y), batch_size=4, epochs=1)[0].params for s in (by_name, built)]
    for a, b in zip(*(jax.tree.leaves(p) for p in trained), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        ConfigError, match=r"unknown optimizer or transform 'adamx'.*did you mean: adam"
    ):
        create_train_state(model, "adamx(lr=1e-2)", x, key)
