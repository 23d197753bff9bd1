"""The evaluation-parameters hook: schedule-free's eval params (checked against optax's own
helper), EMA, parameter groups and the fused path, in `fit`, `evaluate` and the CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.optim import build_optimizer, fused
from jtricks.optim.eval_params import optimizer_eval_params, register_eval_params
from jtricks.training import create_train_state, evaluate, fit

PARAMS = {
    "Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jnp.linspace(0.5, 2.0, 8).reshape(4, 2), "bias": jnp.zeros(2)},
}


def _run(tx, steps=3):
    grads = jax.tree.map(lambda p: 0.1 * p + 0.2, PARAMS)
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_schedule_free_inside_a_pipeline_is_optax_helper_exactly():
    params, state = _run(
        build_optimizer("contrib.schedule_free_adamw | clip_global_norm(1.0)", 0.1)
    )
    sf = state.inner_state[1]  # the chain is (clip, optimizer): found here by hand
    expected = optax.contrib.schedule_free_eval_params(sf, params)
    got = optimizer_eval_params(state, params)
    for e, g, p in zip(
        jax.tree.leaves(expected), jax.tree.leaves(got), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(g, e)
        assert not np.allclose(g, p)  # the hook changes something


def test_an_optimizer_without_eval_params_evaluates_on_the_training_ones():
    params, state = _run(build_optimizer("adam", 0.1))
    assert optimizer_eval_params(state, params) is params


def test_schedule_free_in_one_parameter_group_leaves_the_others_alone():
    tx = build_optimizer("matrices -> contrib.schedule_free_sgd ; rest -> sgd", 0.1)
    params, state = _run(tx)
    got = optimizer_eval_params(state, params)
    # by hand: x = (y - (1 - b1) z) / b1 on the kernels, the biases untouched
    sf = next(
        s
        for s in jax.tree.leaves(
            state, is_leaf=lambda s: isinstance(s, optax.contrib.ScheduleFreeState)
        )
        if isinstance(s, optax.contrib.ScheduleFreeState)
    )
    b1 = float(sf.b1)
    for layer in ("Dense_0", "Dense_1"):
        z = np.asarray(sf.z[layer]["kernel"])
        y = np.asarray(params[layer]["kernel"])
        np.testing.assert_allclose(got[layer]["kernel"], (y - (1 - b1) * z) / b1, rtol=1e-6)
        np.testing.assert_array_equal(got[layer]["bias"], params[layer]["bias"])


def test_fused_schedule_free_equals_the_tree_path():
    params, state = _run(optax.contrib.schedule_free_sgd(0.1))
    fparams, fstate = _run(fused(optax.contrib.schedule_free_sgd(0.1)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        optimizer_eval_params(fstate, fparams),
        optimizer_eval_params(state, params),
    )


def test_a_registered_rule_and_conflicting_declarations():
    class Marker(tuple):
        pass

    register_eval_params(Marker, lambda node, params: jax.tree.map(jnp.zeros_like, params))
    assert jax.tree.leaves(optimizer_eval_params((Marker(),), PARAMS))[0].sum() == 0
    with pytest.raises(ConfigError, match="declares evaluation parameters 2 times"):
        optimizer_eval_params((Marker(), Marker()), PARAMS)
    with pytest.raises(TypeError, match="rule must be callable"):
        register_eval_params(Marker, 3)


def test_lookahead_in_two_groups_evaluates_each_group_on_its_slow_weights():
    """Declaring nodes in disjoint groups each map their own leaves (the kernels' slow
    weights from the first group's state, the biases' from the second's, found by hand);
    nodes over the same leaves (Lookahead around schedule-free) conflict."""
    from jtricks.optim import LookaheadState

    tx = build_optimizer("matrices -> sgd | lookahead(2) ; rest -> sgd | lookahead(3)", 0.1)
    params, state = _run(tx, steps=5)  # synced at step 4 (matrices) and 3 (rest)
    nodes = jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, LookaheadState))
    nodes = [n for n in nodes if isinstance(n, LookaheadState)]
    got = optimizer_eval_params(state, params)
    for layer in PARAMS:
        for leaf, group in (("kernel", 0), ("bias", 1)):
            np.testing.assert_array_equal(got[layer][leaf], nodes[group].slow[layer][leaf])
            assert not np.allclose(got[layer][leaf], params[layer][leaf])  # 5 is no sync
    nested = build_optimizer("contrib.schedule_free_sgd | lookahead", 0.1)
    with pytest.raises(ConfigError, match=r"2 times .* for the same parameters"):
        optimizer_eval_params(_run(nested)[1], PARAMS)


@pytest.fixture(scope="module")
def data():
    from jtricks.data import synthetic

    return synthetic(num_train=120, num_test=40, shape=(8,), num_classes=3, noise=0.3, seed=0)


@pytest.fixture(scope="module")
def schedule_free_run(data):
    from jtricks.nn import build_model

    tx = build_optimizer("contrib.schedule_free_adamw", 1e-2)
    state = create_train_state(
        build_model("mlp(features=(8,))", 3), tx, data.x_train, jax.random.key(0), ema_decay=0.9
    )
    val = (data.x_test, data.y_test)
    state, history = fit(state, (data.x_train, data.y_train), val_data=val, batch_size=40, epochs=2)
    return state, history, val


def test_schedule_free_validates_on_its_eval_params_in_fit(schedule_free_run):
    state, history, val = schedule_free_run
    sf = state.opt_state.inner_state[0]
    by_hand = state.replace(params=optax.contrib.schedule_free_eval_params(sf, state.params))
    expected = evaluate(by_hand, val, params="train")
    last = history.records[-1]
    np.testing.assert_allclose(last["val_loss"], expected["loss"], rtol=1e-5)
    assert evaluate(state, val)["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    on_train = evaluate(state, val, params="train")["loss"]
    assert abs(on_train - expected["loss"]) > 1e-4  # the hook made a difference


def test_ema_source_is_the_ema_state(schedule_free_run):
    state, history, val = schedule_free_run
    expected = evaluate(state.with_ema_params(), val, params="train")
    assert evaluate(state, val, params="ema") == pytest.approx(expected)
    np.testing.assert_allclose(history.records[-1]["val_ema_loss"], expected["loss"], rtol=1e-5)


def test_bad_sources(schedule_free_run, data):
    state, _, val = schedule_free_run
    with pytest.raises(
        ConfigError, match="eval_params must be one of auto, train, ema; got 'best'"
    ):
        evaluate(state, val, params="best")
    no_ema = state.replace(ema_params=None)
    with pytest.raises(ConfigError, match="needs an EMA"):
        fit(no_ema, (data.x_train, data.y_train), batch_size=40, epochs=1, eval_params="ema")


def test_lookahead_trains_in_fit_and_validates_on_its_slow_weights(data):
    """`jtricks.optim.lookahead` in `fit`: 6 steps with sync_period 4 leave the fast weights
    2 steps past the slow ones; validation and `evaluate` use the slow ones, ``params="train"`` the fast ones; `optax.lookahead`, whose slow weights
    would sit in the parameters, is refused by name."""
    from jtricks.nn import build_model
    from jtricks.optim import LookaheadState, lookahead

    model = build_model("mlp(features=(8,))", 3)
    tx = lookahead(optax.adam(1e-2), sync_period=4, alpha=0.5)
    state = create_train_state(model, tx, data.x_train, jax.random.key(0))
    val = (data.x_test, data.y_test)
    state, history = fit(state, (data.x_train, data.y_train), val_data=val, batch_size=40, epochs=2)
    node = state.opt_state
    assert isinstance(node, LookaheadState) and int(node.count) == 6
    expected = evaluate(state.replace(params=node.slow), val, params="train")
    np.testing.assert_allclose(history.records[-1]["val_loss"], expected["loss"], rtol=1e-5)
    assert evaluate(state, val)["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert abs(evaluate(state, val, params="train")["loss"] - expected["loss"]) > 1e-5
    with pytest.raises(ConfigError, match=r"optax\.lookahead keeps its slow weights"):
        create_train_state(
            model, optax.lookahead(optax.adam(1e-2), 4, 0.5), data.x_train, jax.random.key(0)
        )
    with pytest.raises(ConfigError, match=r"inner must be an optax GradientTransformation"):
        lookahead("adam")
