"""Diagnostics: each check passes on a correct model and catches a planted bug."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jtricks
from jtricks import diagnostics as D
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.optim import build_optimizer
from jtricks.tasks import LanguageModel
from jtricks.training import create_train_state, evaluate, make_train_step
from jtricks.training.transfer import finetune_labels, forward_layers

KEY = jax.random.key(0)

# ----------------------------------------------------------------------------- gradient check


@jax.custom_vjp
def _tanh_bad_grad(x):
    return jnp.tanh(x)


def _fwd(x):
    return jnp.tanh(x), x


def _bwd(x, g):  # planted bug: twice the true derivative
    return (2.0 * g * (1.0 - jnp.tanh(x) ** 2),)


_tanh_bad_grad.defvjp(_fwd, _bwd)


class _BadGradMLP(nn.Module):
    zero_head: bool = False

    @nn.compact
    def __call__(self, x, *, train=False):
        h = _tanh_bad_grad(nn.Dense(8, name="hidden")(x))
        zeros = {"kernel_init": nn.initializers.zeros} if self.zero_head else {}
        return nn.Dense(4, name="head", **zeros)(h)


def test_gradient_check_passes_on_correct_models_with_bn_and_dropout(tiny_data):
    x, y = tiny_data.x_train[:8], tiny_data.y_train[:8]
    model = build_model("mlp(features=(8,), norm='batch', dropout=0.3)", 4)
    state = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    # non-trivial running statistics, so "BatchNorm in eval mode" is actually exercised
    state = state.replace(
        batch_stats=jax.tree.map(lambda a: a + 0.5, state.batch_stats),
    )
    report = D.check_gradients(state, x, y)
    assert report.passed, report.table()
    assert [r["layer"] for r in report.rows] == ["Dense_0", "Norm_0", "head"]
    assert all(r["coords"] == 10 for r in report.rows)
    assert max(r["max_rel_error"] for r in report.rows) < 1e-6
    assert "pass" in report.table()


@pytest.mark.parametrize("zero_head", [False, True])
def test_gradient_check_catches_a_wrong_custom_vjp(tiny_data, zero_head):
    """Also below a head started at zero, which passes no gradient down: the check moves
    that kernel to a random point first."""
    x, y = tiny_data.x_train[:8], tiny_data.y_train[:8]
    model = _BadGradMLP(zero_head=zero_head)
    state = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    report = D.check_gradients(state, x, y)
    rows = {r["layer"]: r for r in report.rows}
    assert not report.passed
    assert not rows["hidden"]["passed"] and rows["head"]["passed"]
    # the hand-computed error of a doubled derivative: |2g - g| / |2g| = 0.5
    assert rows["hidden"]["max_rel_error"] == pytest.approx(0.5, abs=1e-6)
    assert "FAIL" in report.table()


def test_bn_eval_interceptor_matches_eval_mode(tiny_data):
    """Training mode with BatchNorm forced to running averages == evaluation mode (no dropout)."""
    x = jnp.asarray(tiny_data.x_train[:8])
    model = build_model("mlp(features=(8,), norm='batch')", 4)
    v = model.init(jax.random.key(0), x)
    v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
    with nn.intercept_methods(D.common.bn_eval_interceptor):
        forced = model.apply(v, x, train=True)
    np.testing.assert_allclose(forced, model.apply(v, x, train=False), rtol=1e-6)


# ----------------------------------------------------------------------------- overfit, initial loss


class _CutOff(nn.Module):
    """Planted bug: the first layer is cut off from the gradient (and too narrow for the head
    to memorise the batch on its own)."""

    @nn.compact
    def __call__(self, x, *, train=False):
        h = jax.lax.stop_gradient(nn.relu(nn.Dense(2)(x)))
        return nn.Dense(4)(h)


@pytest.fixture(scope="module")
def adam_1e2():
    return optax.adam(1e-2)


def test_overfit_one_batch_passes_and_catches_a_cut_off_layer(tiny_data, adam_1e2):
    x, y = tiny_data.x_train[:16], tiny_data.y_train[:16]
    good = D.overfit_one_batch(
        build_model("mlp(features=(32,))", 4), adam_1e2, x, y, key=jax.random.key(0), steps=200
    )
    assert good.passed and good.steps_to_epsilon is not None and good.steps_to_epsilon <= 200
    assert good.losses.shape == (200,) and good.losses[good.steps_to_epsilon - 1] < 0.01
    assert good.losses[: good.steps_to_epsilon - 1].min() >= 0.01  # the first crossing
    bad = D.overfit_one_batch(_CutOff(), adam_1e2, x, y, key=jax.random.key(0), steps=200)
    assert not bad.passed and bad.steps_to_epsilon is None and bad.final_loss > 0.1


def test_overfit_losses_equal_a_hand_loop(tiny_data, adam_1e2):
    x, y = tiny_data.x_train[:16], tiny_data.y_train[:16]
    model = build_model("mlp(features=(32,))", 4)
    rep = D.overfit_one_batch(model, adam_1e2, x, y, key=jax.random.key(0), steps=5)
    state = create_train_state(model, adam_1e2, x, jax.random.key(0))
    step = jax.jit(make_train_step(norms=False, skip_nonfinite=False))
    hand = []
    for _ in range(5):
        state, m = step(state, (jnp.asarray(x), jnp.asarray(y)))
        hand.append(float(m["loss"]))
    np.testing.assert_allclose(rep.losses, hand, rtol=1e-5)
    np.testing.assert_allclose(rep.eval_loss, evaluate(state, (x, y))["loss"], rtol=1e-5)


def test_a_model_with_dropout_passes_on_its_evaluation_mode_loss(tiny_data, adam_1e2):
    """Dropout's noise keeps the training loss of a memorised batch up (the check failed
    every model with dropout); its evaluation-mode loss after the steps is the verdict."""
    x, y = tiny_data.x_train[:64], np.random.default_rng(0).integers(0, 4, 64)  # to memorise
    model = build_model("mlp(features=(128,), dropout=0.5)", 4)
    rep = D.overfit_one_batch(model, adam_1e2, x, y, key=jax.random.key(0), steps=300)
    assert rep.steps_to_epsilon is None and rep.losses.min() > 0.015
    assert rep.passed and rep.eval_loss < 0.006


def test_initial_loss_is_log_c_and_flags_overconfident_init(tiny_data):
    x, y = tiny_data.x_train, tiny_data.y_train
    ok = create_train_state(
        build_model("mlp(features=(32,))", 4), optax.sgd(0.1), x, jax.random.key(0)
    )
    rep = D.initial_loss(ok, x, y, num_classes=4)
    assert rep.expected == pytest.approx(math.log(4)) and rep.passed
    bad = create_train_state(
        build_model("mlp(features=(256,), initializer='standard_normal')", 4),
        optax.sgd(0.1),
        x,
        jax.random.key(0),
    )
    rep = D.initial_loss(bad, x, y, num_classes=4)
    assert not rep.passed and rep.ratio > 2


# ----------------------------------------------------------------------------- signal propagation

DEEP = "mlp(features=(64, 64, 64, 64, 64, 64, 64, 64), initializer={init!r})"


def test_signal_propagation_flags_standard_normal_and_passes_he(tiny_data):
    x, y = tiny_data.x_train[:64], tiny_data.y_train[:64]
    reports = {}
    for init in ("standard_normal", "he_normal"):
        state = create_train_state(
            build_model(DEEP.format(init=init), 4), optax.sgd(0.1), x, jax.random.key(0)
        )
        reports[init] = D.signal_propagation(state, x, y)
    bad, good = reports["standard_normal"], reports["he_normal"]
    assert not bad.passed and any("exploding activations" in f for f in bad.flags)
    assert good.passed, good.flags
    assert [r["layer"] for r in good.rows] == [f"Dense_{i}" for i in range(8)] + ["head"]
    # independent computation of one row: the head's gradient norm by hand
    state = create_train_state(
        build_model(DEEP.format(init="he_normal"), 4), optax.sgd(0.1), x, jax.random.key(0)
    )
    grads = jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(
            state.apply_fn({"params": p}, x, train=True), y
        ).mean()
    )(state.params)
    head = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["head"])))
    assert good.rows[-1]["grad_norm"] == pytest.approx(head, rel=1e-5)
    assert good.grad_ratio == pytest.approx(good.rows[0]["grad_norm"] / head, rel=1e-5)


def test_a_zero_head_is_left_out_of_the_signal_ratios(tiny_data):
    """A head at zero outputs 0 and passes no gradient down: no false "vanishing" flag; the
    output ratio is the body's (by hand from the rows), and a bad body is still flagged."""
    x, y = tiny_data.x_train[:64], tiny_data.y_train[:64]
    reports = {}
    for init in ("standard_normal", "he_normal"):
        spec = DEEP.format(init=init)[:-1] + ", zero_head=True)"
        state = create_train_state(build_model(spec, 4), optax.sgd(0.1), x, jax.random.key(0))
        reports[init] = D.signal_propagation(state, x, y)
    good, bad = reports["he_normal"], reports["standard_normal"]
    assert good.passed and good.zero_head and math.isnan(good.grad_ratio), good.flags
    assert good.rows[-1]["act_std"] == 0 and good.rows[-2]["grad_norm"] == 0
    assert good.act_ratio == pytest.approx(good.rows[-2]["act_std"] / good.rows[0]["act_std"])
    assert any("exploding activations" in f for f in bad.flags)


def test_signal_flags_vanishing_gradients_by_ratio():
    rows = [
        {"layer": "a", "act_mean": 0.0, "act_std": 1.0, "grad_norm": 1e-5},
        {"layer": "b", "act_mean": 0.0, "act_std": 1.0, "grad_norm": 1.0},
    ]
    # a report passes exactly when the flag logic (the code path of real reports) finds none
    assert not D.SignalReport(0, rows, 1e-5, 1.0, _flags_for(1e-5, 1.0)).passed
    assert D.SignalReport(0, rows, 1.0, 1.0, _flags_for(1.0, 1.0)).passed
    assert "vanishing" in _flags_for(1e-5, 1.0)[0]
    assert "exploding gradients" in _flags_for(1e5, 1.0)[0]
    assert _flags_for(1.0, 1.0) == []


def _flags_for(grad_ratio, act_ratio):
    return D.signal.signal_flags(
        [
            {"act_std": 1.0, "grad_norm": grad_ratio},
            {"act_std": act_ratio, "grad_norm": 1.0},
        ],
        grad_ratio,
        act_ratio,
        1e3,
    )


def test_track_signal_reports_at_the_requested_steps(tiny_data, adam_1e2):
    x, y = tiny_data.x_train, tiny_data.y_train
    state = create_train_state(build_model("mlp(features=(8,))", 4), adam_1e2, x, jax.random.key(0))
    state, reports = D.track_signal(state, (x, y), at_steps=(0, 10, 5), batch_size=20)
    assert [r.step for r in reports] == [0, 5, 10] and int(state.step) == 10


# ----------------------------------------------------------------------------- LR finder


def test_lr_finder_equals_separate_runs_and_suggests_a_rate(tiny_data):
    x, y = tiny_data.x_train, tiny_data.y_train
    model = build_model("mlp(features=(8,))", 4)
    make_tx = lambda lr: build_optimizer("adam", lr)  # noqa: E731
    res = D.lr_finder(
        model,
        make_tx,
        (x, y),
        key=jax.random.key(0),
        lr_min=1e-4,
        lr_max=1.0,
        num=8,
        steps=20,
        batch_size=20,
    )
    assert res.losses.shape == (8, 20) and res.lrs.shape == (8,)
    np.testing.assert_allclose(res.lrs, np.geomspace(1e-4, 1.0, 8))
    tail = res.losses[:, -5:].mean(axis=1)  # the last quarter of 20 steps, by hand
    finite = np.isfinite(res.losses).all(axis=1)
    want = res.lrs[finite][np.argmin(tail[finite])]
    assert res.suggestion == res.best == want  # each rate trained whole: its lowest loss
    # a second code path: an ordinary loop at one of the rates, from the same init and batches
    k = 5
    tx = make_tx(float(res.lrs[k]))
    state = create_train_state(model, tx, x, jax.random.key(0))
    step = jax.jit(make_train_step(norms=False))
    from jtricks.data.batching import epoch_indices

    losses = []
    for e in range(2):
        ids = np.asarray(
            epoch_indices(
                jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), e), 200, 20, 10
            )
        )
        for i in ids:
            state, m = step(state, (jnp.asarray(x[i]), jnp.asarray(y[i])))
            losses.append(float(m["loss"]))
    np.testing.assert_allclose(res.losses[k], losses, rtol=2e-4, atol=1e-6)


def test_lr_finder_takes_a_task_and_a_dict_batch():
    """Regression on a dict batch: each rate's losses equal a hand-written SGD loop on the
    mean squared error, over the batches `fit` draws."""
    from jtricks.data.batching import epoch_indices
    from jtricks.tasks import Regression

    rng = np.random.default_rng(0)
    inp = rng.normal(size=(100, 3)).astype(np.float32)
    out = (inp @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    model, lrs = nn.Dense(1), [0.01, 0.1]
    res = D.lr_finder(
        model,
        optax.sgd,
        {"inp": inp, "out": out},
        task=Regression(input_key="inp", target_key="out"),
        key=jax.random.key(0),
        lrs=lrs,
        steps=8,
        batch_size=20,
    )
    params0 = create_train_state(model, optax.sgd(1.0), inp, jax.random.key(0)).params
    mse = lambda p, i: jnp.mean((model.apply({"params": p}, inp[i]) - out[i]) ** 2)  # noqa: E731
    for k, lr in enumerate(lrs):
        params, losses = params0, []
        for e in range(2):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), e)
            for i in np.asarray(epoch_indices(key, 100, 20, 5))[: 8 - 5 * e]:
                loss, grads = jax.value_and_grad(mse)(params, i)
                params = jax.tree.map(lambda p, g, lr=lr: p - lr * g, params, grads)
                losses.append(float(loss))
        np.testing.assert_allclose(res.losses[k], losses, rtol=1e-5)
    with pytest.raises(ConfigError, match="give task or loss_fn, not both"):
        D.lr_range_test(
            model,
            optax.sgd,
            {"inp": inp, "out": out},
            key=jax.random.key(0),
            task="regression",
            loss_fn=mse,
        )


def test_lr_range_test_equals_a_hand_written_adam_loop(tiny_data):
    x, y = tiny_data.x_train, tiny_data.y_train
    model = build_model("mlp(features=(8,))", 4)
    res = D.lr_range_test(
        model,
        lambda lr: build_optimizer("adam", lr),
        (x, y),
        key=jax.random.key(0),
        lr_min=1e-3,
        lr_max=0.1,
        steps=12,
        batch_size=200,  # the whole set each step, so the data order cannot matter
    )
    lrs = 1e-3 * (0.1 / 1e-3) ** (np.arange(12) / 11)
    np.testing.assert_allclose(res.lrs, lrs, rtol=1e-12)
    # second code path: plain optax Adam, its rate changed by hand before every step
    params = create_train_state(model, optax.sgd(1.0), x, jax.random.key(0)).params
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1.0)
    opt_state = tx.init(params)

    def loss(p):
        logits = model.apply({"params": p}, jnp.asarray(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    @jax.jit
    def step(params, opt_state, lr):
        opt_state.hyperparams["learning_rate"] = lr
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    expected = []
    for lr in lrs:
        params, opt_state, value = step(params, opt_state, jnp.asarray(lr, jnp.float32))
        expected.append(float(value))
    np.testing.assert_allclose(res.losses, expected, rtol=1e-4)
    assert res.diverged_at is None and np.isfinite(res.smoothed).all()
    assert res.lrs[0] <= res.suggestion <= res.lrs[-1]
    assert res.best == res.lrs[np.argmin(res.smoothed)]


def test_smooth_losses_is_the_bias_corrected_average_cut_at_divergence():
    losses = np.array([2.0, 1.5, 1.0, 0.5, 3.0, 40.0, 1.0])
    got, diverged_at = D.smooth_losses(losses, beta=0.5, diverge=4.0)
    # closed form: s_i = sum_j (1 - b) b^(i - j) loss_j / (1 - b^(i + 1))
    i = np.arange(len(losses))
    w = np.where(i[None, :] <= i[:, None], 0.5 * 0.5 ** (i[:, None] - i[None, :]), 0.0)
    s = w @ losses / (1 - 0.5 ** (i + 1))
    first = int(np.argmax([s[k] > 4 * s[: k + 1].min() for k in i]))
    assert diverged_at == first == 5
    np.testing.assert_allclose(got[:first], s[:first], rtol=1e-12)
    assert np.isnan(got[first:]).all()
    # a non-finite loss diverges at once
    assert D.smooth_losses(np.array([1.0, np.nan, 1.0]))[1] == 1
    assert D.smooth_losses(np.array([1.0, 0.9]))[1] is None


def test_lr_range_test_cuts_a_diverging_run(tiny_data, tmp_path):

    model = build_model("mlp(features=(8,))", 4)
    data = (tiny_data.x_train, tiny_data.y_train)
    res = D.lr_range_test(
        model,
        lambda lr: build_optimizer("sgd", lr),
        data,
        key=jax.random.key(0),
        lr_min=1e-2,
        lr_max=1e4,
        steps=30,
        batch_size=20,
    )
    assert res.diverged_at is not None and np.isnan(res.smoothed[res.diverged_at :]).all()
    assert res.lrs[0] <= res.suggestion < res.lrs[res.diverged_at]
    res.plot(tmp_path / "range.png")
    assert (tmp_path / "range.png").stat().st_size > 0
    for kwargs, name in (
        ({"steps": 1}, "steps"),
        ({"lr_max": 1e-9}, "lr_max"),
        ({"beta": 1.0}, "beta"),
    ):
        with pytest.raises(ConfigError, match=name):
            D.lr_range_test(
                model, lambda lr: build_optimizer("sgd", lr), data, key=jax.random.key(0), **kwargs
            )
    run = D.make_lr_sweep(
        model,
        lambda lr: build_optimizer("sgd", lr),
        data,
        key=jax.random.key(0),
        steps=3,
        batch_size=20,
    )
    with pytest.raises(ConfigError, match=r"\(K, 3\)"):
        run(jnp.ones((2, 4)))
    # the data is an argument of the program, not a constant folded into it
    text = run.lower(jnp.ones((2,))).as_text()
    assert "tensor<200x16xf32>" in text
    assert not [ln for ln in text.splitlines() if "constant" in ln and "tensor<200x16xf32>" in ln]


def test_the_range_suggestion_skips_the_warm_up_and_the_last_steps_as_fastai_does():
    # 40 steps: a noisy drop in the first tenth (the smoothing's start), flat, a real
    # descent around lr 1e-1, then a rise over the last five steps
    lrs = np.geomspace(1e-7, 10.0, 40)
    curve = np.full(40, 0.67)
    curve[0], curve[1], curve[2] = 0.70, 0.62, 0.64
    curve[24:33] = 0.67 - 0.02 * np.arange(1, 10)
    curve[33:] = curve[32] + 0.01 * np.arange(1, 8)
    window = slice(4, 35)  # 40 // 10 ... 40 - 5
    slope = np.gradient(
        curve[window][: int(np.argmin(curve[window])) + 1],
        np.log(lrs[window])[: int(np.argmin(curve[window])) + 1],
    )
    expected = lrs[window][int(np.argmin(slope))]
    assert D.range_suggestion(lrs, curve) == expected
    assert 1e-3 < expected < 10 and D.steepest_descent(lrs, curve) < 1e-6  # the noise
    short = np.array([1.0, 0.5, 0.4, 0.45])  # too short to leave anything out
    assert D.range_suggestion(lrs[:4], short) == D.steepest_descent(lrs[:4], short)


def test_steepest_descent_on_a_hand_made_curve():
    lrs = np.array([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    final = np.array([2.0, 1.9, 1.0, 0.8, 0.7, np.nan])
    # slopes by central differences on log lr: the steepest fall is around 1e-2
    assert D.steepest_descent(lrs, final) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="diverged"):
        D.steepest_descent(lrs, np.full(6, np.nan))


def test_lr_finder_takes_any_optax_optimizer(tiny_data):
    """An optimizer without an injected rate (optax.adam, jtricks.optim.adam) is built at
    rate 1 with its updates scaled by the rate: the same losses as the injected Adam."""
    from jtricks.optim import adam

    data = (tiny_data.x_train, tiny_data.y_train)
    kw = dict(key=jax.random.key(0), steps=4, batch_size=20, lrs=[1e-3, 1e-2, 1e-1])
    model = build_model("mlp(features=(8,))", 4)
    injected = D.lr_finder(
        model, lambda lr: optax.inject_hyperparams(optax.adam)(learning_rate=lr), data, **kw
    )
    for make_tx in (optax.adam, lambda lr: adam(lr)):
        got = D.lr_finder(model, make_tx, data, **kw)
        np.testing.assert_allclose(got.losses, injected.losses, rtol=1e-5)
    ranged = D.lr_range_test(model, optax.adam, data, key=jax.random.key(0), steps=5, batch_size=20)
    assert ranged.losses.shape == (5,) and np.isfinite(ranged.losses[0])


def test_layers_are_reported_in_forward_order_not_alphabetical(tiny_data):
    x, y = tiny_data.x_train[:16], tiny_data.y_train[:16]
    model = build_model("resnet20(stage_sizes=(1, 1), widths=(4, 8))", 4)
    state = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    layers = [r["layer"] for r in D.signal_propagation(state, x, y).rows]
    # alphabetically "stage..." sorts before "stem"; the forward pass starts at the stem
    assert layers[:2] == ["stem", "stem_norm"] and layers[-1] == "head"
    assert layers.index("stage2_block1/shortcut") > layers.index("stage1_block1/Conv1D_1")


# ----------------------------------------------------------------------------- CLI

TINY = [
    "--dataset",
    "synthetic(num_train=200, num_test=50, shape=(16,), num_classes=4, noise=0.5)",
    "--model",
    "mlp(features=(16,))",
    "--batch-size",
    "20",
    "--overfit-steps",
    "100",
    "--signal-steps",
    "0,5",
    "--lr-num",
    "4",
    "--lr-steps",
    "5",
]


def test_cli_diagnose_prints_verdicts_and_writes_plots(tmp_path, capsys):
    import json

    from jtricks.cli import main

    out = tmp_path / "diag"
    assert main(["diagnose", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for check in (
        "initial loss",
        "gradient check",
        "overfit one batch",
        "signal propagation, step 5",
        "LR finder",
    ):
        assert check in text
    assert "all checks passed" in text
    for name in ("diagnose.json", "lr_finder.png", "signal.png", "overfit.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "diagnose.json").read_text())
    assert saved["passed"] and len(saved["reports"]["lr_finder"]["lrs"]) == 4
    assert saved["reports"]["lr_finder"]["method"] == "sweep"


def test_cli_diagnose_with_the_range_test(tmp_path, capsys):
    import json

    from jtricks.cli import main

    out = tmp_path / "diag"
    assert (
        main(["diagnose", *TINY, "--lr-method", "range", "--lr-steps", "20", "--out", str(out)])
        == 0
    )
    assert "LR range test" in capsys.readouterr().out
    saved = json.loads((out / "diagnose.json").read_text())["reports"]["lr_finder"]
    assert saved["method"] == "range" and len(saved["lrs"]) == len(saved["losses"]) == 20
    assert (out / "lr_finder.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--signal-steps", "0,x", "--signal-steps"),
        ("--lr-num", "1", "--lr-num"),
        ("--lr-max", "1e-09", "--lr-max"),
        ("--overfit-steps", "0", "--overfit-steps"),
        ("--target-scale", "standardize", "--target-scale"),  # a classification dataset
    ],
)
def test_cli_diagnose_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, flag, value, needle):
    from jtricks.cli import main

    out = tmp_path / "diag"
    assert main(["diagnose", *TINY, flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and value in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset", "tokens(num_train=64, num_test=8, seq_len=8, vocab=8)"], "outputs of shape"),
        (["--model", "transformer_lm(d_model=8, heads=2, layers=1)"], "cannot be initialised"),
    ],
)
def test_cli_diagnose_refuses_a_model_that_does_not_fit_the_data_before_any_folder(
    tmp_path, capsys, args, needle
):
    """A classifier on token sequences (its outputs do not fit the targets) was a NumPy
    traceback after the run folder existed; a token model on real inputs left an empty
    folder. Both are one line now, checked as `fit` checks its data, with no folder."""
    from jtricks.cli import main

    out = tmp_path / "diag"
    assert main(["diagnose", *TINY, *args, "--out", str(out)]) == 2  # later flags win
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_cli_diagnose_unknown_lr_method_exits_2(tmp_path, capsys):
    from jtricks.cli import main

    out = tmp_path / "diag"
    with pytest.raises(SystemExit) as e:
        main(["diagnose", *TINY, "--lr-method", "bogus", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lr-method" in err and "bogus" in err and "range" in err
    assert not out.exists()


def test_cli_diagnose_checks_a_language_model_against_its_own_references(tmp_path, capsys):
    import json

    from jtricks.cli import main

    out = tmp_path / "diag"
    args = ["--dataset", "tokens(num_train=64, num_test=8, seq_len=8, vocab=8)"]
    args += ["--model", "transformer_lm(d_model=16, heads=2, layers=1)", "--batch-size", "16"]
    args += ["--overfit-steps", "3", "--signal-steps", "0"]
    args += ["--lr-num", "2", "--lr-steps", "2", "--out", str(out)]
    main(["diagnose", *args])
    assert "gradient check" in capsys.readouterr().out
    reports = json.loads((out / "diagnose.json").read_text())["reports"]
    assert reports["initial_loss"]["expected"] == pytest.approx(math.log(8), rel=1e-6)
    assert reports["gradient_check"]["passed"]  # the float64 token cross-entropy
    data = jtricks.load_dataset("tokens(num_train=64, num_test=8, seq_len=8, vocab=8)")
    floor = D.memorisation_floor(LanguageModel(), (data.x_train[:32], data.y_train[:32]))
    assert reports["overfit"]["floor"] == pytest.approx(floor) and floor > 0


# ----------------------------------------------------------------------------- other tasks


def test_initial_loss_of_a_regression_is_the_zero_outputs_mean_square(tiny_data):
    x = tiny_data.x_train[:64]
    y = np.stack([x[:, 0] + 1.0, x[:, 1] - 0.5], axis=1)  # off-centre targets
    state = create_train_state(build_model("mlp(features=(16,))", 2), optax.sgd(0.1), x, KEY)
    rep = D.initial_loss(state, x, y, task="regression")
    out = state.apply_fn({"params": state.params}, x, train=False)
    assert rep.loss == pytest.approx(float(np.mean((np.asarray(out) - y) ** 2)), rel=1e-5)
    assert rep.expected == pytest.approx(float(np.mean(y**2)), rel=1e-6)
    assert rep.ratio == pytest.approx(rep.loss / rep.expected)
    with pytest.raises(ConfigError, match="num_classes=3 but the model gives 2 outputs"):
        D.initial_loss(state, x, y, task="regression", num_classes=3)


def test_gradient_check_and_signal_take_a_task_and_a_dict_batch(tiny_data):
    x = tiny_data.x_train[:8]
    batch = {"x": x, "y": x[:, :2] * 2.0}
    state = create_train_state(build_model("mlp(features=(8,))", 2), optax.sgd(0.1), x, KEY)
    assert D.check_gradients(state, batch, task="regression").passed
    rep = D.signal_propagation(state, batch, task="regression")

    def loss(p):  # the mean squared error, written out
        return jnp.mean((state.apply_fn({"params": p}, x, train=True) - batch["y"]) ** 2)

    grads = jax.grad(loss)(state.params)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads["Dense_0"]))))
    assert rep.rows[0]["layer"] == "Dense_0"
    assert rep.rows[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_memorisation_floor_of_a_language_model_batch_by_hand():
    x = np.array([[1, 2, 4], [1, 3, 4], [1, 2, 4]])
    y = np.array([[2, 4, 5], [3, 4, 6], [2, 4, 7]])
    # position 0: prefix (1,) is followed by 2, 3, 2: -(2 log 2/3 + log 1/3);
    # position 2: prefix (1, 2, 4) twice, followed by 5 and 7: 2 log 2; the rest is unique
    by_hand = -(2 * math.log(2 / 3) + math.log(1 / 3)) + 2 * math.log(2)
    assert D.memorisation_floor(LanguageModel(), (x, y)) == pytest.approx(by_hand / 9)
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    by_hand = -(2 * math.log(2 / 3) + math.log(1 / 3))  # position 2 of row 0 masked
    assert D.memorisation_floor(LanguageModel(), (x, y, mask)) == pytest.approx(by_hand / 8)
    assert D.memorisation_floor(jtricks.tasks.build_task("classification"), (x, y)) == 0.0


def test_overfit_one_batch_of_a_language_model_aims_above_its_floor(adam_1e2):
    data = jtricks.load_dataset("tokens(num_train=16, num_test=4, seq_len=6, vocab=6)")
    batch = {"tokens": data.x_train, "targets": data.y_train}
    model = build_model("transformer_lm(d_model=16, heads=2, layers=1)", 6)
    rep = D.overfit_one_batch(model, adam_1e2, batch, key=KEY, steps=4, task="lm", epsilon=5.0)
    floor = D.memorisation_floor(LanguageModel(), batch)
    assert rep.floor == pytest.approx(floor) and floor > 0
    first = int(np.flatnonzero(rep.losses < floor + 5.0)[0]) + 1
    assert rep.passed and rep.steps_to_epsilon == first


class _TwoHeads(nn.Module):
    """A user's own model: reads a dict of arrays, gives 2 outputs."""

    @nn.compact
    def __call__(self, batch, *, train=False):
        h = nn.tanh(nn.Dense(8)(jnp.concatenate([batch["a"], batch["b"]], axis=-1)))
        return nn.Dense(2, kernel_init=nn.initializers.zeros)(h)


def test_check_model_takes_a_users_model_optimizer_and_dict_batch(tmp_path):
    import json

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 3)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
    data = {"a": a, "b": b, "y": np.stack([a[:, 0] + 2.0, b[:, 1]], axis=1)}
    task = jtricks.tasks.Regression(input_key="*")  # the model reads the whole batch
    settings = D.CheckSettings(batch_size=16, overfit_batch=16, overfit_steps=3)
    settings = dataclasses.replace(settings, signal_steps=(0,), lr_num=2, lr_steps=2)
    out = tmp_path / "diag"
    result = D.check_model(
        _TwoHeads(), optax.adam, data, task=task, settings=settings, learning_rate=1e-3, out=out
    )
    assert [c["check"] for c in result["checks"]][:3] == [
        "initial loss",
        "gradient check",
        "overfit one batch",
    ]
    init = result["reports"]["initial_loss"]  # a zero-initialised head outputs exactly zero
    assert init["loss"] == pytest.approx(init["expected"]) and init["ratio"] == pytest.approx(1.0)
    assert init["expected"] == pytest.approx(float(np.mean(data["y"] ** 2)), rel=1e-6)
    assert result["checks"][1]["passed"]  # the gradient check of the user's model
    saved = json.loads((out / "diagnose.json").read_text())["settings"]
    assert saved["learning_rate"] == 1e-3 and saved["lr_num"] == 2 and saved["signal_steps"] == [0]
    too_big = dataclasses.replace(settings, overfit_batch=65)  # of 64 examples
    with pytest.raises(ConfigError, match=r"overfit_batch.*65"):
        D.check_model(_TwoHeads(), optax.adam, data, task=task, settings=too_big)


class _NNXNet(nnx.Module):
    def __init__(self, rngs, bad=False):
        self.hidden = nnx.Linear(16, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)
        self.bad = bad

    def __call__(self, x):
        h = self.norm(self.hidden(x))
        return self.head(_tanh_bad_grad(h) if self.bad else jnp.tanh(h))


def test_gradient_check_and_signal_on_an_nnx_model(tiny_data):
    x, y = tiny_data.x_train[:8], tiny_data.y_train[:8]
    state = create_train_state(_NNXNet(nnx.Rngs(0)), optax.sgd(0.1), x, KEY)
    report = D.check_gradients(state, x, y)
    assert report.passed and {r["layer"] for r in report.rows} == {"hidden", "norm", "head"}
    bad = create_train_state(_NNXNet(nnx.Rngs(0), bad=True), optax.sgd(0.1), x, KEY)
    rows = {r["layer"]: r for r in D.check_gradients(bad, x, y).rows}
    assert not rows["hidden"]["passed"] and rows["head"]["passed"]  # below the planted bug
    rep = D.signal_propagation(state, x, y)

    def loss(params):  # the NNX module's own forward pass in training mode, by hand
        rest = jax.tree.map(lambda a: a, state.batch_stats)  # variables of this trace
        model = nnx.merge(state.apply_fn.train_graph, params, rest)
        return optax.softmax_cross_entropy_with_integer_labels(model(jnp.asarray(x)), y).mean()

    grads = jax.grad(loss)(state.params)

    def norm(layer):
        return float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[layer]))))

    # forward order, not name order ("head" sorts first): the first reads of each layer
    assert [r["layer"] for r in rep.rows] == ["hidden", "norm", "head"]
    assert [r["grad_norm"] for r in rep.rows] == pytest.approx(
        [norm("hidden"), norm("norm"), norm("head")], rel=1e-5
    )
    assert rep.grad_ratio == pytest.approx(norm("hidden") / norm("head"), rel=1e-5)
    model = nnx.merge(state.apply_fn.train_graph, state.params, state.batch_stats)
    hidden = model.hidden(jnp.asarray(x))  # the outputs by hand
    logits = model.head(jnp.tanh(model.norm(hidden)))
    assert rep.rows[0]["act_std"] == pytest.approx(float(hidden.std()), rel=1e-5)
    assert rep.act_ratio == pytest.approx(float(logits.std() / hidden.std()), rel=1e-5)
    assert rep.passed
    head_only = {"hidden": False, "norm": False, "head": True}  # --finetune head
    assert finetune_labels("head", forward_layers(state, x)) == head_only


def test_diagnose_points_far_targets_to_target_scale_and_checks_them_standardized(tmp_path):
    """Regression targets 3000 +- 2: the overfit check fails on them as they are, and its
    detail says why and what to use; with ``target_scale="standardize"`` the initial loss
    is that of standardized targets (about 1, against 1 for zero outputs, by hand) and
    the batch is overfit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (3000 + 2 * np.tanh(x[:, :1])).astype(np.float32)
    np.savez(tmp_path / "far.npz", x=x, y=y, x_test=x[:20], y_test=y[:20])
    settings = dict(dataset=f"npz:{tmp_path / 'far.npz'}", model="mlp(features=(16,))")
    settings.update(batch_size=20, overfit_steps=100, signal_steps=(0, 5), lr_num=4, lr_steps=5)
    plain = D.diagnose(**settings, out=tmp_path / "plain")
    over = {c["check"]: c for c in plain["checks"]}["overfit one batch"]
    assert not over["passed"] and over["detail"].endswith(": --target-scale standardize")
    scaled = D.diagnose(**settings, target_scale="standardize", out=tmp_path / "scaled")
    checks = {c["check"]: c for c in scaled["checks"]}
    assert checks["overfit one batch"]["passed"]
    zero = scaled["reports"]["initial_loss"]["expected"]
    assert zero == pytest.approx(1.0, rel=1e-5)  # the mean square of standardized targets


def test_cli_diagnose_reads_the_targets_for_the_task_given(tmp_path, capsys):
    """``--task regression`` on whole-number targets (read as 4 classes by default): the
    initial loss is checked against the zero output's mse, ``mean(y^2)`` by hand, not
    ``log 4``, and ``diagnose.json`` names the task."""
    import json

    from jtricks.cli import main

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = np.clip(np.round(1.5 + x[:, 0]), 0, 3).astype(np.int64)
    np.savez(tmp_path / "counts.npz", x=x, y=y, x_test=x[:20], y_test=y[:20])
    args = [*TINY[2:], "--dataset", f"npz:{tmp_path / 'counts.npz'}", "--out"]
    main(["diagnose", *args, str(tmp_path / "a")])
    main(["diagnose", *args, str(tmp_path / "b"), "--task", "regression"])
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "diagnose.json").read_text()) for d in "ab")
    assert a["reports"]["initial_loss"]["expected"] == pytest.approx(np.log(4), rel=1e-6)
    assert b["reports"]["initial_loss"]["expected"] == pytest.approx(np.mean(y**2.0), rel=1e-5)
    assert (a["settings"]["task"], b["settings"]["task"]) == ("classification", "regression")
