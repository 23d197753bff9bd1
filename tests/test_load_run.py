"""`jtricks.load_run`: a run folder's model back in Python, with its input scaling."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import jtricks
from jtricks import ConfigError, evaluate, load_dataset, predict
from jtricks.cli import main
from jtricks.optim import schedules
from jtricks.run import build as build_module

SPEC = "synthetic(num_train=160, num_test=60, shape=(8,), num_classes=3, noise=0.5)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "run"
    result = jtricks.train(
        dataset=SPEC, model="mlp(features=(8,))", epochs=4, batch_size=16, ema=0.9, out=out
    )
    return out, result


def test_a_finished_run_loads_as_it_ended(trained):
    """The loaded state is the run's last: its test metrics are the ones summary.json
    holds, and predict on raw inputs applies the run's scaler (fitted on its training rows:
    the raw test inputs' mean is far from 0)."""
    out, result = trained
    run = jtricks.load_run(out)
    data = load_dataset(SPEC)
    assert (run.epoch, run.step) == (4, int(result.state.step))
    summary = json.loads((out / "summary.json").read_text())
    got = evaluate(run.state, (run.inputs(data.x_test), data.y_test))
    assert got["accuracy"] == summary["test_accuracy"] == result.test["accuracy"]
    np.testing.assert_allclose(got["loss"], summary["test_loss"], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, run.state.params, result.state.params)
    scaled = run.scaler(data.x_test)
    np.testing.assert_array_equal(run.predict(data.x_test), predict(result.state, scaled))
    assert not np.allclose(scaled, data.x_test)


def test_the_result_of_train_predicts_on_raw_inputs_as_the_loaded_run(trained):
    """`jtricks.train`'s result scales raw inputs as the run did (it had no scaler, so
    ``predict(result.state, raw_x)`` was the only way, on unscaled inputs): its predictions
    are the loaded run's and give the summary's test accuracy."""
    out, result = trained
    data = load_dataset(SPEC)
    got = result.predict(data.x_test)
    np.testing.assert_array_equal(got, jtricks.load_run(out).predict(data.x_test))
    assert (got.argmax(-1) == data.y_test).mean() == pytest.approx(result.test["accuracy"])
    assert not np.allclose(got, predict(result.state, data.x_test))  # unscaled inputs
    np.testing.assert_array_equal(result.predict_combined(data.x_test), got)


def test_predict_uses_the_parameters_the_run_evaluated(tmp_path):
    """A run with ``eval_params="ema"`` reported its EMA's figures: ``run.predict`` gives the
    EMA's outputs (it gave the training parameters'), ``params=`` still chooses."""
    out = tmp_path / "run"
    settings = dict(model="mlp(features=(8,))", epochs=2, batch_size=16, ema=0.5)
    jtricks.train(dataset=SPEC, **settings, eval_params="ema", out=out)
    run, x = jtricks.load_run(out), load_dataset(SPEC).x_test
    scaled = run.inputs(x)
    ema, train = (predict(run.state, scaled, params=p) for p in ("ema", "train"))
    assert not np.allclose(ema, train)
    np.testing.assert_array_equal(run.predict(x), ema)
    np.testing.assert_array_equal(run.predict(x, params="train"), train)


def test_predict_combined_is_the_ensembles_prediction_the_summary_scored(trained, tmp_path):
    """An ``--ensemble 2`` run: `predict` gives each member's logits, `predict_combined`
    the log of their mean softmax (computed here by hand in float64), from which the
    summary's test accuracy and loss follow; a single run's is `predict`'s."""
    out = tmp_path / "run"
    settings = dict(model="mlp(features=(8,))", epochs=2, batch_size=16, ensemble=2)
    jtricks.train(dataset=SPEC, **settings, out=out)
    run, data = jtricks.load_run(out), load_dataset(SPEC)
    summary = json.loads((out / "summary.json").read_text())
    members = np.asarray(run.predict(data.x_test), np.float64)
    assert members.shape == (2, 60, 3)
    p = np.exp(members - members.max(-1, keepdims=True))
    log_mean = np.log((p / p.sum(-1, keepdims=True)).mean(0))
    got = run.predict_combined(data.x_test)
    np.testing.assert_allclose(got, log_mean, atol=1e-5)
    assert (got.argmax(-1) == data.y_test).mean() == pytest.approx(summary["test_accuracy"])
    loss = -log_mean[np.arange(60), data.y_test].mean()
    np.testing.assert_allclose(loss, summary["test_loss"], rtol=1e-5)
    single = jtricks.load_run(trained[0])
    np.testing.assert_array_equal(single.predict_combined(data.x_test), single.predict(data.x_test))


def test_best_reads_the_epoch_of_the_lowest_validation_loss(trained):
    out, _ = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = min(records, key=lambda r: r["val_loss"])
    assert jtricks.load_run(out, best=True).epoch == best["epoch"]


def test_a_folder_written_before_a_refusal_still_loads_and_resumes(tmp_path, monkeypatch):
    """``log_every_steps`` above the run's steps and a warm-up past its end are refused
    when a run starts; a folder written before those refusals existed (here: with them
    switched off) is rebuilt without them, so `load_run` and ``--resume`` still read it."""
    out = tmp_path / "run"
    settings = dict(model="mlp(features=(8,))", epochs=2, batch_size=16, checkpoint_every=1)
    settings.update(log_every_steps=1000, schedule="warmup(epochs=5)")
    with pytest.raises(ConfigError, match=r"log_every_steps=1000|warm-up.s end"):
        jtricks.train(dataset=SPEC, **settings)
    registry = schedules._registry
    with monkeypatch.context() as m:  # the checks of an older jtricks: none
        m.setattr(build_module, "within_run", lambda *a: None)
        m.setattr(schedules, "_registry", lambda v, s, t, ends: registry(v, s, t, False))
        result = jtricks.train(dataset=SPEC, **settings, out=out)
    run = jtricks.load_run(out)
    jax.tree.map(np.testing.assert_array_equal, run.state.params, result.state.params)
    (out / "summary.json").unlink()  # cut after epoch 1, resumed: the same end
    shutil.rmtree(out / "checkpoints" / "epoch-000002")
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    resumed = jtricks.load_run(out)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, result.state.params)


def test_what_is_not_a_run_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot load .* does not exist") as e:
        jtricks.load_run(tmp_path)
    assert e.value.param == "run"


@pytest.mark.parametrize("ensemble", [1, 2])
def test_early_stopping_reports_the_state_it_kept(tmp_path, ensemble):
    """Stopped early, a run evaluates the best epoch's state: the summary's validation
    metrics are that epoch's (they were the last epoch's, beside test metrics of another
    state), ``restored_epoch`` names it, and the loaded state gives the test metrics. An
    ensemble is one model: it stops on the ensemble's validation loss."""
    out = tmp_path / "run"
    noisy = SPEC.replace("noise=0.5", "noise=2.0")
    settings = dict(model="mlp(features=(32,))", epochs=40, batch_size=16, learning_rate=0.05)
    settings["ensemble"] = ensemble
    result = jtricks.train(dataset=noisy, **settings, early_stopping=2, out=out)
    summary = json.loads((out / "summary.json").read_text())
    records = result.history.records
    best = min(records, key=lambda r: r["val_loss"])
    assert summary["restored_epoch"] == best["epoch"] < records[-1]["epoch"]
    assert summary["val_loss"] == best["val_loss"] != records[-1]["val_loss"]
    assert summary["val_accuracy"] == best["val_accuracy"]
    assert f"kept epoch {best['epoch']}'s state" in summary["stopped"]
    run, data = jtricks.load_run(out), load_dataset(noisy)
    assert (run.epoch, run.step) == (best["epoch"], best["step"])  # the state's, not the stop's
    got = evaluate(run.state, (run.inputs(data.x_test), data.y_test))
    assert got["accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("extra", [dict(swa=2), dict(early_stopping=20)])
def test_the_newest_checkpoint_is_the_state_the_run_tested(tmp_path, extra):
    """A callback that replaces the state at the end (SWA's average, its BatchNorm
    statistics re-estimated; early stopping's best epoch when patience never ran out) has
    it written over the last epoch's checkpoint: `load_run` and ``--pretrained`` took the
    last epoch's parameters, not those of the summary's test metrics."""
    out = tmp_path / "run"
    noisy = SPEC.replace("noise=0.5", "noise=2.0")
    settings = dict(model="mlp(features=(32,), norm='batch')", epochs=6, batch_size=16)
    settings["checkpoint_every"] = 2  # the last epoch is written before the end
    result = jtricks.train(dataset=noisy, **settings, learning_rate=0.3, out=out, **extra)
    summary = json.loads((out / "summary.json").read_text())
    if "early_stopping" in extra:  # the best epoch is not the last
        assert summary["restored_epoch"] < 6 and result.history.stopped is None
    run, data = jtricks.load_run(out), load_dataset(noisy)
    for a, b in zip(
        jax.tree.leaves((run.state.params, run.state.batch_stats)),
        jax.tree.leaves((result.state.params, result.state.batch_stats)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    got = evaluate(run.state, (run.inputs(data.x_test), data.y_test))
    assert got["accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize(
    "settings",
    [
        {"logit_adjust": 1.0, "tta": 3, "tta_augment": "noise(0.1)"},
        {"class_weight": "balanced", "ensemble": 2},
        {"task": "regression", "target_scale": "standardize", "ensemble": 2},
        {"task": "regression"},
    ],
)
def test_a_run_loads_from_its_folder_alone_after_its_data_moved(tmp_path, settings):
    """``config.json`` records the data's shapes (input shape and dtype, output width, class
    counts, a regression's center): a folder whose ``npz`` file is gone loads with the task
    the run built (its class weights, logit offsets, center and scale) and predicts as it
    did; a folder without that record (written before it) reads the dataset again."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0.6).astype(np.int64) + (x[:, 1] > 1.0)  # 3 classes of unequal sizes
    if settings.get("task") == "regression":
        y = (100.0 + x[:, :1] + 0.1 * rng.normal(size=(200, 1))).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x[:160], y=y[:160], x_test=x[160:], y_test=y[160:])
    result = jtricks.train(
        dataset=f"npz:{tmp_path / 'd.npz'}",
        model="mlp(features=(8,))",
        epochs=2,
        out=tmp_path / "run",
        **settings,
    )
    (tmp_path / "d.npz").rename(tmp_path / "moved.npz")
    run = jtricks.load_run(tmp_path / "run")
    assert run.task == result.task
    np.testing.assert_array_equal(run.predict(x[160:]), result.predict(x[160:]))
    if "tta" in settings:
        got = result.predict_tta(x[160:])  # train's result predicts as the loaded run
        np.testing.assert_array_equal(run.predict_tta(x[160:]), got)
        hits = got.argmax(-1) == y[160:]  # as the summary's test figure
        assert hits.mean() == pytest.approx(result.test["accuracy"])
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    del record["shapes"]  # as a folder written before
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"d\.npz"):
        jtricks.load_run(tmp_path / "run")
    (tmp_path / "moved.npz").rename(tmp_path / "d.npz")
    assert jtricks.load_run(tmp_path / "run").task == result.task
