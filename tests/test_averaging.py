"""EMA, SWA, vmapped ensembles and transfer learning by freezing (T09, T26)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.training import create_train_state, fit, make_train_step, predict
from jtricks.training.averaging import SWA, recompute_batch_stats
from jtricks.training.checkpoint import restore, save
from jtricks.training.ensemble import (
    create_ensemble,
    evaluate_ensemble,
    fit_ensemble,
    predict_proba,
)
from jtricks.training.transfer import (
    finetune_labels,
    forward_layers,
    freeze,
    freeze_batch_stats,
    load_pretrained,
    preset_patterns,
)

MLP = "mlp(features=(16, 16))"


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data.x_train, tiny_data.y_train


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _hand_ema(model, tx, data, decay: float, steps: int, field: str):
    """``(state, plain, hand)``: ``steps`` steps of batch 20 with an EMA of ``decay``,
    the same without one, and the average of ``plain``'s ``field`` (``params`` or
    ``batch_stats``) computed by hand in float64, ``d avg + (1 - d) value``."""
    x, y = data
    state = create_train_state(model, tx, x, jax.random.key(0), ema_decay=decay)
    plain = create_train_state(model, tx, x, jax.random.key(0))
    step = jax.jit(make_train_step())
    hand = [np.asarray(a, np.float64) for a in jax.tree.leaves(getattr(plain, field))]
    for i in range(steps):
        batch = (jnp.asarray(x[20 * i : 20 * i + 20]), jnp.asarray(y[20 * i : 20 * i + 20]))
        state, _ = step(state, batch)
        plain, _ = step(plain, batch)
        new = jax.tree.leaves(getattr(plain, field))
        hand = [decay * h + (1 - decay) * np.asarray(v) for h, v in zip(hand, new, strict=True)]
    return state, plain, hand


def test_ema_equals_a_hand_computed_average(data, adam):
    state, plain, hand = _hand_ema(build_model(MLP, 4), adam, data, 0.8, 6, "params")
    for a, b in zip(_leaves(state.ema_params), hand, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(_leaves(state.params), _leaves(plain.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the EMA never touches training
    assert state.with_ema_params().params is state.ema_params


def test_ema_is_validated_and_checkpointed(data, adam, tmp_path):
    x, y = data
    state = create_train_state(build_model(MLP, 4), adam, x, jax.random.key(0), ema_decay=0.9)
    state, hist = fit(state, (x, y), val_data=(x[:50], y[:50]), batch_size=20, steps=10)
    assert {"val_ema_loss", "val_ema_accuracy"} <= set(hist.records[-1])
    save(tmp_path, "epoch-000001", state, {"epoch": 1})
    target = create_train_state(build_model(MLP, 4), adam, x, jax.random.key(1), ema_decay=0.9)
    back, _ = restore(tmp_path / "epoch-000001", target)
    for a, b in zip(_leaves(back.ema_params), _leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="ema_decay"):
        create_train_state(build_model(MLP, 4), adam, x, jax.random.key(0), ema_decay=1.0)


def test_ema_averages_batchnorm_statistics_and_evaluates_with_them(data, adam, tmp_path):
    """The EMA of the running statistics follows ``d avg + (1 - d) stats`` step by step
    (float64 by hand from a run without an EMA); the EMA is evaluated with them, not the
    live ones; they survive a checkpoint, and one written before they were kept restarts
    them from the restored statistics."""
    x, _ = data
    model = build_model("mlp(features=(16,), norm='batch')", 4)
    state, _, hand = _hand_ema(model, adam, data, 0.7, 5, "batch_stats")
    for a, b in zip(_leaves(state.ema_batch_stats), hand, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(_leaves(state.ema_batch_stats)[1], _leaves(state.batch_stats)[1])
    ema = state.evaluation_state("ema")
    assert ema.params is state.ema_params and ema.batch_stats is state.ema_batch_stats
    logits = state.apply_fn(
        {"params": state.ema_params, "batch_stats": state.ema_batch_stats}, x[:8], train=False
    )
    np.testing.assert_allclose(predict(state, x[:8], params="ema"), logits, rtol=1e-5)
    save(tmp_path, "epoch-000001", state, {"epoch": 1})
    target = create_train_state(model, adam, x, jax.random.key(1), ema_decay=0.7)
    back, _ = restore(tmp_path / "epoch-000001", target)
    for a, b in zip(_leaves(back.ema_batch_stats), _leaves(state.ema_batch_stats), strict=True):
        np.testing.assert_array_equal(a, b)
    save(tmp_path, "epoch-000002", state.replace(ema_batch_stats=None), {"epoch": 2})
    older, _ = restore(tmp_path / "epoch-000002", target)
    for a, b in zip(_leaves(older.ema_batch_stats), _leaves(state.batch_stats), strict=True):
        np.testing.assert_array_equal(a, b)
    no_stats = create_train_state(build_model(MLP, 4), adam, x, jax.random.key(0), ema_decay=0.7)
    assert no_stats.ema_batch_stats is None  # nothing to average, nothing kept


def test_a_debiased_ema_averages_the_steps_only(data, adam):
    """``ema_debias``: after ``k`` steps the EMA reads ``sum_i (1 - d) d^(k-i) v_i /
    (1 - d^k)`` of the steps' parameters and BatchNorm statistics ``v_i`` (float64 by
    hand from a run without an EMA; no share of the initial ones), and the live values
    before the first step."""
    x, y = data
    model = build_model("mlp(features=(16,), norm='batch')", 4)
    state = create_train_state(model, adam, x, jax.random.key(0), ema_decay=0.9, ema_debias=True)
    jax.tree.map(np.testing.assert_array_equal, state.with_ema_params().params, state.params)
    plain = create_train_state(model, adam, x, jax.random.key(0))
    step = jax.jit(make_train_step())
    seen = []
    for i in range(4):
        batch = (jnp.asarray(x[20 * i : 20 * i + 20]), jnp.asarray(y[20 * i : 20 * i + 20]))
        state, _ = step(state, batch)
        plain, _ = step(plain, batch)
        seen.append([_leaves(plain.params), _leaves(plain.batch_stats)])
    ema = state.with_ema_params()
    weights = np.array([0.1 * 0.9 ** (3 - i) for i in range(4)]) / (1 - 0.9**4)
    for part, got in enumerate((_leaves(ema.params), _leaves(ema.batch_stats))):
        for j, leaf in enumerate(got):
            hand = sum(w * seen[i][part][j].astype(np.float64) for i, w in enumerate(weights))
            np.testing.assert_allclose(leaf, hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["adam | lookahead", "contrib.schedule_free_adamw"])
def test_swa_refuses_an_optimizer_that_evaluates_on_its_own(data, spec, tmp_path, capsys):
    """Evaluation would read the optimizer's own parameters (the slow weights, schedule-free's
    x), never SWA's average: refused in `fit` at the first averaged epoch, and by the CLI
    before anything trains or is written."""
    from jtricks.cli import main
    from jtricks.optim import build_optimizer

    x, y = data
    tx = build_optimizer(spec, 1e-2)
    state = create_train_state(build_model(MLP, 4), tx, x, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"swa averages the training parameters.*evaluates on"):
        fit(state, (x, y), batch_size=20, epochs=2, callbacks=[SWA(1)])
    out = tmp_path / "run"
    argv = ["train", "--model", MLP, "--optimizer", spec, "--swa", "1", "--epochs", "2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 2
    assert "--swa: swa averages" in capsys.readouterr().err and not out.exists()


def test_swa_averages_epoch_ends_and_recomputes_batchnorm(data, adam):
    x, y = data
    model = build_model("mlp(features=(16,), norm='batch')", 4)
    state = create_train_state(model, adam, x, jax.random.key(0))
    copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (fit donates its input)
    # reference: the parameters at the end of epochs 2, 3, 4 from a plain run
    ref, ends = copy(state), []
    for _ in range(4):
        ref, _ = fit(ref, (x, y), batch_size=20, epochs=1, data_key=jax.random.key(3))
        ends.append(_leaves(ref.params))
    swa = SWA(2, x, batch_size=50)
    out, _ = fit(
        copy(state), (x, y), batch_size=20, epochs=4, data_key=jax.random.key(3), callbacks=[swa]
    )
    assert swa.count == 3
    for i, leaf in enumerate(_leaves(out.params)):
        np.testing.assert_allclose(
            leaf, np.mean([e[i] for e in ends[1:]], axis=0), rtol=1e-5, atol=1e-6
        )
    # BatchNorm statistics re-estimated for the averaged weights: batch means by hand
    h = np.asarray(x, np.float64) @ np.asarray(out.params["Dense_0"]["kernel"], np.float64)
    h += np.asarray(out.params["Dense_0"]["bias"])
    batches = h.reshape(4, 50, -1)
    np.testing.assert_allclose(
        out.batch_stats["Norm_0"]["mean"], batches.mean(1).mean(0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        out.batch_stats["Norm_0"]["var"], batches.var(1).mean(0), rtol=1e-4, atol=1e-5
    )
    # the standalone function gives the same
    again = recompute_batch_stats(out, x, batch_size=50)
    np.testing.assert_allclose(again["Norm_0"]["var"], out.batch_stats["Norm_0"]["var"], rtol=1e-6)


def test_an_ensembles_swa_equals_each_members_own_and_plateau_scales_every_member(data):
    """Stacked states: SWA averages and re-estimates BatchNorm per member, as separate runs
    do; reduce-on-plateau (monitoring the ensemble) scales every member's rate, replayed
    by hand from the records with the Keras rule."""
    from jtricks.optim import build_optimizer
    from jtricks.training import ReduceLROnPlateau

    x, y = data
    model = build_model("mlp(features=(16,), norm='batch')", 4)
    keys = jax.random.split(jax.random.key(0), 2)
    run = dict(batch_size=20, epochs=4, data_key=jax.random.key(3), val_data=(x[:60], y[:60]))
    # SGD: the gradient of a bias before BatchNorm is float noise, which Adam would scale
    # to full steps (and vmapped and plain programs round differently)
    swa, sgd = SWA(2, x, batch_size=50), optax.sgd(0.1)
    states, _ = fit_ensemble(create_ensemble(model, sgd, x, keys), (x, y), **run, callbacks=[swa])
    for i in range(2):
        own = SWA(2, x, batch_size=50)
        one, _ = fit(create_train_state(model, sgd, x, keys[i]), (x, y), **run, callbacks=[own])
        for a, b in zip(
            _leaves((one.params, one.batch_stats)),
            _leaves((states.params, states.batch_stats)),
            strict=True,
        ):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-6)
    tx = build_optimizer("adam", 0.3, plateau=True)  # large enough to stall
    plateau = ReduceLROnPlateau(0.5, 1)
    states, hist = fit_ensemble(
        create_ensemble(model, tx, x, keys), (x, y), **run, callbacks=[plateau]
    )
    best, wait, scale = np.inf, 0, 1.0
    for r in hist.records:
        if r["val_loss"] < best:
            best, wait = r["val_loss"], 0
        elif (wait := wait + 1) >= 1:
            wait, scale = 0, scale * 0.5
    assert scale < 1.0  # the rate dropped at least once
    got = optax.tree_utils.tree_get(states.opt_state, "plateau_scale")
    np.testing.assert_allclose(got, [scale, scale])


def test_vmapped_ensemble_equals_separate_runs(data):
    x, y = data
    model = build_model("mlp(features=(16,), dropout=0.2)", 4)
    tx = optax.adam(1e-2)
    keys = jax.random.split(jax.random.key(0), 3)
    dk = jax.random.key(5)
    states = create_ensemble(model, tx, x, keys)
    states, hist = fit_ensemble(
        states, (x, y), val_data=(x[:60], y[:60]), batch_size=20, steps=25, data_key=dk
    )
    rec = hist.records[-1]
    assert rec["step"] == 25 and len(rec["val_member_accuracy"]) == 3
    for i in range(3):
        s = create_train_state(model, tx, x, keys[i])
        s, _ = fit(s, (x, y), batch_size=20, steps=25, data_key=dk)
        for a, b in zip(_leaves(s.params), _leaves(states.params), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-6)
    # fit takes the stacked states as they are: the same program as fit_ensemble
    same, _ = fit(create_ensemble(model, tx, x, keys), (x, y), batch_size=20, steps=25, data_key=dk)
    jax.tree.map(np.testing.assert_array_equal, same.params, states.params)
    # without a data key both default alike (from member 0's key)
    a, _ = fit(create_ensemble(model, tx, x, keys), (x, y), batch_size=20, steps=5)
    b, _ = fit_ensemble(create_ensemble(model, tx, x, keys), (x, y), batch_size=20, steps=5)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    # the ensemble predicts the mean of the members' softmax probabilities
    probs = np.mean(
        [
            jax.nn.softmax(
                model.apply({"params": jax.tree.map(lambda a, i=i: a[i], states.params)}, x[:60])
            )
            for i in range(3)
        ],
        axis=0,
    )
    np.testing.assert_allclose(predict_proba(states, x[:60]), probs, rtol=1e-5, atol=1e-6)
    ev = evaluate_ensemble(states, (x[:60], y[:60]), batch_size=25)
    assert ev["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y[:60]))
    assert ev["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(60), y[:60]])), rel=1e-4)
    assert ev["member_accuracy"] == pytest.approx(rec["val_member_accuracy"])


def test_frozen_parameters_are_bit_identical(data):
    x, y = data
    model = build_model(MLP, 4)
    probe = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    layers = forward_layers(probe, x)
    assert layers == ["Dense_0", "Dense_1", "head"]
    assert finetune_labels("last:2", layers) == {"Dense_0": False, "Dense_1": True, "head": True}
    tx = freeze(optax.adamw(1e-2, weight_decay=0.1), trainable=preset_patterns("head", layers))
    state = create_train_state(model, tx, x, jax.random.key(0))
    before = jax.tree.map(np.array, state.params)
    state, _ = fit(state, (x, y), batch_size=20, steps=20)
    for name in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(state.params[name][leaf]), before[name][leaf])
    assert not np.array_equal(np.asarray(state.params["head"]["kernel"]), before["head"]["kernel"])
    # patterns the other way round
    tx = freeze(optax.sgd(0.5), frozen=["Dense_*"])
    s = create_train_state(model, tx, x, jax.random.key(0))
    s, _ = fit(s, (x, y), batch_size=20, steps=5)
    np.testing.assert_array_equal(
        np.asarray(s.params["Dense_1"]["kernel"]), before["Dense_1"]["kernel"]
    )
    with pytest.raises(ConfigError, match="last:K"):
        finetune_labels("last:0", layers)
    with pytest.raises(ConfigError, match="head, last:K, all"):
        finetune_labels("middle", layers)


def test_frozen_batch_statistics_stay_and_the_rest_train_as_without(data):
    """`freeze_batch_stats` keeps the matching running statistics bit-identical; training
    is otherwise that of the same run without it (the forward pass in training mode uses
    the batch's statistics either way): equal parameters, equal other statistics."""
    x, y = data
    model = build_model("mlp(features=(8, 8), norm='batch')", 4)
    plain = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    before = jax.tree.map(np.array, plain.batch_stats)
    fresh = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0))
    held = freeze_batch_stats(fresh, ["Norm_0/*"])  # shares fresh's arrays: fit consumes both
    assert held.frozen_stats == ("Norm_0/*",)
    by_layers = freeze_batch_stats(plain, trainable=["Dense_1/*", "Norm_1/*", "head/*"])
    assert by_layers.frozen_stats == ("Norm_0/mean", "Norm_0/var")
    held, _ = fit(held, (x, y), batch_size=20, steps=5)
    plain, _ = fit(plain, (x, y), batch_size=20, steps=5)
    jax.tree.map(np.testing.assert_array_equal, held.params, plain.params)
    jax.tree.map(np.testing.assert_array_equal, held.batch_stats["Norm_0"], before["Norm_0"])
    jax.tree.map(
        np.testing.assert_array_equal, held.batch_stats["Norm_1"], plain.batch_stats["Norm_1"]
    )
    assert not np.array_equal(plain.batch_stats["Norm_0"]["mean"], before["Norm_0"]["mean"])
    with pytest.raises(ConfigError, match="frozen pattern 'Norm_9/\\*' matches no batch stat"):
        freeze_batch_stats(plain, ["Norm_9/*"])


def test_load_pretrained_copies_matching_layers(data, tmp_path):
    x, _ = data
    src = create_train_state(build_model(MLP, 4), optax.sgd(0.1), x, jax.random.key(0))
    save(tmp_path / "checkpoints", "epoch-000001", src, {"epoch": 1})
    dst = create_train_state(build_model(MLP, 7), optax.adam(1e-3), x, jax.random.key(9))
    new, info = load_pretrained(dst, tmp_path)  # a run folder: its newest checkpoint
    assert sorted(info["kept"]) == ["head/bias", "head/kernel"]
    np.testing.assert_array_equal(new.params["Dense_0"]["kernel"], src.params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(new.params["head"]["kernel"], dst.params["head"]["kernel"])
    with pytest.raises(ConfigError, match="no jtricks checkpoint"):
        load_pretrained(dst, tmp_path / "nothing")
    other = create_train_state(  # 5 classes: not even the head's bias has the same shape
        build_model("cnn(channels=(2, 2, 2))", 5), optax.sgd(0.1), x, jax.random.key(0)
    )
    with pytest.raises(ConfigError, match="shares no parameter"):
        load_pretrained(other, tmp_path)


TINY = [
    "--dataset",
    "synthetic(num_train=200, num_test=60, shape=(16,), num_classes=4, noise=2.0)",
    "--model",
    "mlp(features=(16,))",
    "--steps",
    "20",
    "--batch-size",
    "20",
    "--no-progress",
]


def test_cli_ensemble_ema_swa_and_finetune(tmp_path, capsys):
    from jtricks.cli import main

    assert main(["train", *TINY, "--ensemble", "3", "--out", str(tmp_path / "ens")]) == 0
    out = capsys.readouterr().out
    assert "member test_accuracy" in out
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert len(summary["test_member_accuracy"]) == 3 and summary["ensemble"] == 3
    assert main(["train", *TINY, "--ema", "0.9", "--swa", "2", "--out", str(tmp_path / "ema")]) == 0
    assert "ema test_accuracy" in capsys.readouterr().out
    assert "test_ema_accuracy" in json.loads((tmp_path / "ema" / "summary.json").read_text())
    args = ["--pretrained", str(tmp_path / "ema"), "--finetune", "head"]
    assert main(["train", *TINY, *args, "--out", str(tmp_path / "ft")]) == 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--ensemble", "0"], "--ensemble"),
        (["--ema", "1.5"], "--ema"),
        (["--ema-debias"], "ema_debias corrects an EMA: give ema (a decay)"),
        (["--swa", "0"], "--swa"),
        (["--swa", "2", "--early-stopping", "2"], "keeps its best epoch's state: give one"),
        (["--swa", "2", "--ema", "0.9", "--eval-params", "ema"], "would never be evaluated"),
        (["--finetune", "head"], "--finetune"),
        (["--pretrained", "/nonexistent/run"], "--pretrained"),
    ],
)
def test_cli_bad_averaging_inputs_exit_2(tmp_path, capsys, extra, needle):
    from jtricks.cli import main

    out = tmp_path / "run"
    assert main(["train", *TINY, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()
