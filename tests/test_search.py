"""Hyper-parameter search (T21): trials side by side equal to separate `fit` runs,
selection on the validation split only, the folder's files, a resumed search, a
diverging trial, and the CLI's one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jtricks import TrainConfig, load_dataset, load_run
from jtricks.cli import main
from jtricks.errors import ConfigError
from jtricks.run import train
from jtricks.run.build import build, with_pretrained
from jtricks.run.data import load_run_data
from jtricks.run.options import fit_options
from jtricks.search import runner as search_runner
from jtricks.search.runner import SearchSettings, search
from jtricks.search.space import trial_config
from jtricks.training import create_train_state, fit

DATASET = "synthetic(num_train=300, num_test=60, shape=(16,), num_classes=3, noise=2.0)"
CONFIG = TrainConfig(
    dataset=DATASET,
    model="mlp",
    epochs=2,
    batch_size=50,
    optimizer="momentum(gamma=0.9) | l2(lam=1e-4)",
)
SPACE = (
    "lr=loguniform(1e-3, 3e-1), gamma=uniform(0.5, 0.95), label_smoothing=uniform(0, 0.2), "
    "l2.lam=loguniform(1e-5, 1e-1)"  # another stage's argument, side by side too
)


@pytest.fixture(scope="module")
def data():
    return load_run_data(CONFIG)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("search") / "s"
    result = search(CONFIG, SearchSettings(SPACE, 4, "random", 4), out=out, data=data)
    return result, out


def test_every_trial_is_recorded_and_the_best_is_the_argmax(searched):
    result, out = searched
    lines = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["trial"] for r in lines) == [0, 1, 2, 3]
    scores = [r["score"] for r in sorted(lines, key=lambda r: r["trial"])]
    assert all(r["status"] == "ok" and r["score"] == r["val_accuracy"][-1] for r in lines)
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == int(np.argmax(scores)) == result.best["trial"]
    assert best["test"] == result.test and set(result.test) >= {"loss", "accuracy"}
    assert (out / "search.png").stat().st_size > 0
    assert json.loads((out / "search.json").read_text())["search"]["space"] == SPACE


def test_each_trial_equals_a_separate_fit_of_its_own_config(searched, data):
    """The independent path: the trial's config built as `jtricks train` builds it (the
    plain optimizer with its numbers, the task with its label smoothing; no injection,
    no vmap), `fit` from the trial's key."""
    result, _ = searched
    _assert_trials_equal_separate_fits(CONFIG, result.records[:2], data, rtol=1e-4)


def _assert_trials_equal_separate_fits(base, records, data, rtol):
    for record in records:
        _, history = _separate_fit(base, record, data)
        np.testing.assert_allclose(history["val_loss"], record["val_loss"], rtol=rtol)


def _separate_fit(base, record, data, callbacks=()):
    """The trial's own run: its config built as `jtricks train` builds it, `fit` from the
    trial's key (no vmap, no injected hyper-parameters)."""
    config = trial_config(base, record["values"])
    b = build(config, data, None, False)
    key = jax.random.fold_in(b.init_key, record["trial"])
    state = create_train_state(b.model, b.tx, data.example, key)
    state, _ = with_pretrained(config, b, state)  # as jtricks train loads it
    options = dataclasses.replace(fit_options(config, b, None), mesh=None)
    run = dict(val_data=data.val, steps=b.total_steps, data_key=b.data_key)
    return fit(state, data.train, options, **run, callbacks=list(callbacks))


def test_trials_stop_early_each_on_its_own_like_separate_runs(tmp_path, data):
    """``early_stopping``: every trial stops and keeps its best epoch as its own run would
    (curves up to its stop, scored on the kept epoch); best/ is that finished run."""
    from jtricks.training import EarlyStopping

    config = dataclasses.replace(CONFIG, epochs=6, early_stopping=1)
    settings = SearchSettings("lr=loguniform(1e-2, 1.0)", 3, "random", 3)
    result = search(config, settings, out=tmp_path / "s", data=data)
    lengths = set()
    for record in result.records:
        early = EarlyStopping(1)
        kept, history = _separate_fit(config, record, data, [early])
        np.testing.assert_allclose(history["val_loss"], record["val_loss"], rtol=1e-4)
        assert record["kept_epoch"] == early.best_epoch
        assert record["score"] == pytest.approx(history["val_accuracy"][early.best_epoch - 1])
        lengths.add(len(record["val_loss"]))
        if record["trial"] == result.best["trial"]:
            loaded = load_run(tmp_path / "s" / "best")
            assert loaded.epoch == early.best_epoch
            close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
            jax.tree.map(close, kept.params, loaded.state.params)
    assert len(lengths) > 1 and min(lengths) < 6  # each stopped on its own
    summary = json.loads((tmp_path / "s" / "best" / "summary.json").read_text())
    assert summary["restored_epoch"] == result.best["kept_epoch"]
    assert summary["test_loss"] == result.test["loss"]


def test_trials_take_what_a_single_run_takes_like_separate_fits(tmp_path, data):
    """Stacked trials with mixup (each with its own key), gradient accumulation, bf16
    compute and ``--pretrained RUN --finetune head`` (every trial from the run's weights,
    only the head trains: the other layers bit-identical in best/) equal separate fits of
    their configs; the best trial's test metrics are test-time augmented as its own
    run's are."""

    trained = train(dataclasses.replace(CONFIG, epochs=1), out=tmp_path / "pre")
    config = dataclasses.replace(CONFIG, mixup=0.4, accumulate=2, precision="bf16", epochs=1)
    config = dataclasses.replace(config, tta=3, augment="noise(0.1)")
    config = dataclasses.replace(config, pretrained=str(tmp_path / "pre"), finetune="head")
    settings = SearchSettings("lr=loguniform(1e-3, 3e-1)", 2, "random", 2)
    lines: list[str] = []
    result = search(config, settings, out=tmp_path / "s", data=data, log=lines.append)
    assert [r["status"] for r in result.records] == ["ok", "ok"]
    assert [x for x in lines if x.startswith("pretrained: parameters of")] == lines[:1]
    _assert_trials_equal_separate_fits(config, result.records, data, rtol=1e-5)
    pre, tuned = trained.state.params, load_run(tmp_path / "s" / "best").state.params
    head = list(pre)[-1]
    assert [k for k in pre if not np.array_equal(pre[k]["kernel"], tuned[k]["kernel"])] == [head]
    resumed = train(resume=tmp_path / "s" / "best").test
    assert set(result.test) == {k for k in resumed if k != "tta_views"}
    assert result.test["loss"] != result.test["single_view_loss"]
    raw, best = load_dataset(DATASET).x_test, load_run(tmp_path / "s" / "best")
    np.testing.assert_allclose(result.predict_tta(raw), best.predict_tta(raw), atol=1e-5)
    for name, value in result.test.items():
        assert resumed[name] == pytest.approx(value, rel=1e-5), name


def test_the_best_folder_is_a_run_that_resumes_and_tests_the_same(searched):
    result, out = searched
    resumed = train(resume=out / "best")
    assert resumed.config == result.best_config
    for name, value in result.test.items():
        assert resumed.test[name] == pytest.approx(value, rel=1e-5), name


def test_the_result_predicts_with_the_best_trials_model(searched, data):
    """`SearchResult.predict` on raw inputs gives the best trial's predictions: the same
    as its run folder's `load_run` (a second path, from disk), and scoring the test
    accuracy the search reported (by hand). No folder needed, no second training."""
    result, out = searched
    raw = load_dataset(DATASET).x_test
    logits = result.predict(raw)
    np.testing.assert_allclose(logits, load_run(out / "best").predict(raw), rtol=1e-5, atol=1e-6)
    accuracy = (logits.argmax(-1) == np.asarray(data.test[1])).mean()
    assert accuracy == pytest.approx(result.test["accuracy"], abs=1e-6)
    assert result.config is result.best_config and result.scaler is not None


def test_selection_never_reads_the_test_split(searched, data):
    """Poisoned test labels change the best trial's test metrics, never the choice."""
    result, _ = searched
    x, y = data.test
    poisoned = dataclasses.replace(data, test=(x, (np.asarray(y) + 1) % 3))
    other = search(CONFIG, SearchSettings(SPACE, 4, "random", 4), data=poisoned)
    assert [r["val_loss"] for r in other.records] == [r["val_loss"] for r in result.records]
    assert other.best["trial"] == result.best["trial"]
    assert other.test["accuracy"] != result.test["accuracy"]


def test_a_killed_search_resumes_with_its_finished_trials(tmp_path, searched, data, monkeypatch):
    result, _ = searched
    out, calls = tmp_path / "s", []
    real = search_runner.train_group

    def killed_at_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search_runner, "train_group", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        search(CONFIG, SearchSettings(SPACE, 4, "random", 2), out=out, data=data)
    assert len((out / "trials.jsonl").read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(search_runner, "train_group", real)
    resumed = search(resume=out, data=data)
    assert [r["trial"] for r in resumed.records] == [0, 1, 2, 3]
    for a, b in zip(resumed.records, result.records, strict=True):  # 2 members, not 4
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-4)
    assert resumed.best["trial"] == result.best["trial"]
    other = dataclasses.replace(data, digest="0" * 64)  # data changed since the start
    with pytest.raises(ConfigError, match="differ from those it started with"):
        search(resume=out, data=other)


def test_a_diverging_trial_fails_alone(data):
    space = "lr=choice(0.05, 1e30), gamma=choice(0.9), label_smoothing=choice(0.1)"
    result = search(CONFIG, SearchSettings(space, 2, "grid", 2), data=data)
    ok, failed = result.records
    assert (ok["status"], failed["status"], failed["score"]) == ("ok", "failed", None)
    assert failed["skipped_steps"] == 10 and ok["skipped_steps"] == 0
    assert result.best["trial"] == 0


def test_tpe_asks_optuna_and_gets_told_every_score(data):
    pytest.importorskip("optuna")
    result = search(CONFIG, SearchSettings(SPACE, 4, "tpe", 2), data=data)
    assert [r["status"] for r in result.records] == ["ok"] * 4
    assert len({r["values"]["learning_rate"] for r in result.records}) == 4


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--space", "seed=choice(1, 2)"], "cannot vary"),
        (["--space", "lr=loguniform(1e-3, 1e-1)", "--method", "bayes"], "--method"),
        (["--space", "lr=loguniform(1e-3, 1e-1)", "--parallel", "0"], "--parallel"),
        (["--trials", "2"], "--space"),
        (["--space", "lr=loguniform(1e-3, 1e-1)", "--ensemble", "2"], "stacked"),
        (["--space", "lr=loguniform(1e-3, 1e-1)", "--swa", "2"], "does not support swa=2"),
        (["--space", "weight_decay=uniform(0, 0.1)"], "unexpected keyword argument"),
        (["--space", "lr=loguniform(1e-3, 1e-1)", "--tensorboard"], "does not support tensorboard"),
        (["--space", "lr=loguniform(1e-3, 1e-1)", "--dataset", "tokens"], "need model outputs"),
        (["--space", "clip.max_norm=uniform(1, 2)"], "--space: space clip.max_norm: the optimizer"),
        (
            ["--space", "b1=uniform(0.8, 1.5)"],
            "space b1=1.5: in optimizer stage 'adam': b1 must satisfy",
        ),
        (  # an optimizer argument that takes integers: its range's middle is checked too
            ["--optimizer", "adam | lookahead", "--space", "lookahead.sync_period=uniform(2, 10)"],
            "space lookahead.sync_period=6.0: in optimizer stage 'lookahead': sync_period must",
        ),
        (  # built on the data before the first trial: an augmentation, a model
            ["--space", "augment=choice('shift(2)', 'hflip')"],
            "space augment='hflip': augment 'hflip' does not fit examples of shape (16,)",
        ),
        (
            ["--space", "model=choice('mlp', 'transformer_lm')"],
            "space model='transformer_lm': the model cannot be initialised on examples",
        ),
        (  # a grid cut short: the last learning rate would never be tried
            [
                *("--space", "lr=loguniform(1e-3, 1e-1), batch_size=choice(32, 64)"),
                *("--method", "grid", "--trials", "5"),
            ],
            "argument --trials: trials=5 would try the first 5 of the grid's 6 points",
        ),
        (  # a metric the task does not report: it raised KeyError after the first trials
            ["--space", "lr=loguniform(1e-3, 1e-1)", "--metric", "f1"],
            "argument --metric: metric='f1' is not a validation metric of the classification "
            "task; it reports: accuracy, balanced_accuracy, loss, macro_f1",
        ),
        (  # refused on the data before the first trial trains, not after it
            ["--space", "batch_size=choice(50, 500)"],
            "space batch_size=500: batch_size must satisfy 1 <= batch_size * accumulate <= 270",
        ),
        (  # one combination of two dimensions: 20 steps are under an epoch of batches of 10
            [
                "--steps",
                "20",
                "--space",
                "batch_size=choice(10, 100), schedule=choice('constant', 'warmup')",
            ],
            "space batch_size=10, schedule='warmup': warmup schedule: its warm-up's end",
        ),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, capsys, extra, match):
    out = tmp_path / "s"
    status = main(["search", "--dataset", DATASET, "--model", "mlp", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_prints_the_table_and_the_best_trial(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["search", "--dataset", DATASET, "--model", "mlp", "--epochs", "2", "--batch-size"]
    argv += ["50", "--optimizer", CONFIG.optimizer, "--trials", "2", "--parallel", "2"]
    argv += ["--space", SPACE]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "jtricks search: trials 0, 1 side by side in" in captured.err  # the group's line
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out.splitlines()[:3] == printed.splitlines()[:3] and quiet.err == ""
    best = json.loads((out / "best.json").read_text())
    head = ["trial", "learning_rate", "gamma", "label_smoothing", "l2.lam", "val_accuracy"]
    head += ["status"]
    assert printed.splitlines()[0].split() == head
    assert printed.splitlines()[1].split()[0] == str(best["trial"])
    assert f"best trial {best['trial']}" in printed


def test_a_search_over_the_batch_size_trains_integer_batches(data):
    """A range over an integer setting (it drew 39.79 and refused the trial)."""
    config = dataclasses.replace(CONFIG, epochs=1)
    settings = SearchSettings("batch_size=uniform(40, 60)", 2, "random", 2)
    result = search(config, settings, data=data)
    sizes = [r["values"]["batch_size"] for r in result.records]
    assert all(type(b) is int and 40 <= b <= 60 for b in sizes) and len(set(sizes)) == 2
    assert [r["status"] for r in result.records] == ["ok", "ok"]
    assert result.best_config.batch_size == result.best["values"]["batch_size"]


def test_the_metric_is_one_the_task_reports_and_val_names_it_too(data):
    """The names come from the evaluation step traced in shapes; ``val_loss`` (as the
    records spell it) is read as ``loss``; a regression reports its own."""
    check = search_runner.check_metric
    assert check(CONFIG, SearchSettings(SPACE, metric="val_loss"), data).metric == "loss"
    assert check(CONFIG, SearchSettings(SPACE, metric="macro_f1"), data).metric == "macro_f1"
    assert check(CONFIG, SearchSettings(SPACE), data).metric is None
    reg = dataclasses.replace(CONFIG, dataset="regression(num_train=100, num_test=20)")
    names = sorted(
        search_runner.validation_metrics(
            build(reg, load_run_data(reg), None, False), load_run_data(reg)
        )
    )
    assert names == ["loss", "mae", "mse", "r2"]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="trials"):
        SearchSettings(SPACE, 0).check()
    with pytest.raises(ConfigError, match="give no other settings"):
        search(CONFIG, resume="somewhere")


def test_a_signal_keeps_a_search_folder_with_finished_trials(tmp_path):
    """What SIGINT / SIGTERM do before they end the command (`undo_new_runs`): a search
    folder with a finished trial stays, one without goes."""
    from jtricks.rundir import clear_untrained

    kept, gone = tmp_path / "kept", tmp_path / "gone"
    for folder in (kept, gone):
        folder.mkdir()
        (folder / "search.json").write_text("{}")
    (kept / "trials.jsonl").write_text('{"trial": 0}\n')
    assert not clear_untrained(kept, created=True) and (kept / "trials.jsonl").exists()
    assert clear_untrained(gone, created=True) and not gone.exists()


def test_integer_optimizer_arguments_are_fixed_per_program():
    """Real values train side by side (in the state); an integer argument may shape the
    program (Muon's ``ns_steps``, Lookahead's ``sync_period``: traced, `%` or a loop of
    that length fails), so trials that differ in one form separate groups."""
    from jtricks.search.trials import group_trials, split_values

    values = {"learning_rate": 0.1, "l2.lam": 1e-3, "lookahead.sync_period": 5, "batch_size": 32}
    fixed, side = split_values(values)
    assert side == {"learning_rate": 0.1, "l2.lam": 1e-3}
    assert fixed == {"lookahead.sync_period": 5, "batch_size": 32}
    config = dataclasses.replace(CONFIG, optimizer="adam | lookahead")
    trials = [{"learning_rate": lr, "lookahead.sync_period": k} for lr, k in ((0.1, 2), (0.2, 5))]
    trials += [{"learning_rate": 0.3, "lookahead.sync_period": 2}]
    assert group_trials(config, trials, parallel=4) == [[0, 2], [1]]
