"""A user's files reach every task (`jtricks.data.targets`): the kind and shape of the
targets in an ``npz:`` file or ``shards:`` folder give the task and the output width,
``--task`` may name another that reads them, and the same arrays train the same way from
either (two code paths: arrays in memory against shards streamed from disk)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jtricks.cli import main
from jtricks.data import load_dataset, write_shards
from jtricks.data.datasets import for_task
from jtricks.data.shards import load_shards
from jtricks.errors import ConfigError

RNG = np.random.default_rng(0)
X, XT = RNG.normal(size=(120, 8)).astype(np.float32), RNG.normal(size=(40, 8)).astype(np.float32)
W = RNG.normal(size=(8, 3))
TOKENS, TOKENS_TEST = RNG.integers(0, 12, size=(120, 9)), RNG.integers(0, 12, size=(40, 9))
CASES = {  # name: (x, y, x_test, y_test, inferred task, outputs, model)
    "labels": (X, (X[:, 0] > 0).astype(np.int64), XT, (XT[:, 0] > 0).astype(np.int64),
               "classification", 2, "mlp(features=(8,))"),
    "zero-one matrix": (X, (X @ W > 0).astype(np.int64), XT, (XT @ W > 0).astype(np.int64),
                        "multilabel", 3, "mlp(features=(8,))"),
    "real targets": (X, (X @ W).astype(np.float32), XT, (XT @ W).astype(np.float32),
                     "regression", 3, "mlp(features=(8,))"),
    "per position": (X, (X > 0.5).astype(np.int32) + (X > 1.5), XT,
                     (XT > 0.5).astype(np.int32) + (XT > 1.5),
                     "segmentation", 3, "fcn1d(channels=(8,), dilations=(1,))"),
    "tokens": (TOKENS[:, :-1], TOKENS[:, 1:], TOKENS_TEST[:, :-1], TOKENS_TEST[:, 1:],
               "lm", 12, "transformer_lm(d_model=8, heads=2, layers=1)"),
}  # fmt: skip


def _write(tmp_path, name):
    x, y, xt, yt = CASES[name][:4]
    np.savez(tmp_path / "data.npz", x=x, y=y, x_test=xt, y_test=yt)
    write_shards(tmp_path / "shards" / "train", {"x": x, "y": y}, shard_size=50)
    write_shards(tmp_path / "shards" / "test", {"x": xt, "y": yt}, shard_size=50)
    return f"npz:{tmp_path / 'data.npz'}", f"shards:{tmp_path / 'shards'}"


@pytest.mark.parametrize("name", list(CASES))
def test_the_targets_give_the_task_and_the_output_width(tmp_path, name):
    *_, task, outputs, _ = CASES[name]
    npz, shards = _write(tmp_path, name)
    data, splits = load_dataset(npz), load_shards(shards)
    assert (data.task, data.num_classes) == (task, outputs) == (splits.task, splits.num_classes)
    want = np.float32 if task in ("multilabel", "regression") else np.int32
    assert data.y_train.dtype == want


@pytest.mark.parametrize("name", ["zero-one matrix", "real targets", "tokens"])
def test_npz_and_shards_train_alike_from_the_cli(tmp_path, capsys, name):
    """The same arrays as an .npz (in memory) and as shards (streamed): the same run."""
    model = CASES[name][-1]
    summaries = []
    for spec in _write(tmp_path, name):
        out = tmp_path / f"run-{spec.split(':')[0]}"
        argv = ["train", "--dataset", spec, "--model", model, "--epochs", "2"]
        assert main([*argv, "--batch-size", "20", "--no-progress", "--out", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    a, b = summaries
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    capsys.readouterr()


def test_task_names_another_reading_of_the_targets(tmp_path, capsys):
    """0/1 reals are a regression by their kind and a multi-label problem with --task
    multilabel (3 outputs, label accuracy logged); integer labels are a regression of one
    output with --task regression; a task that cannot read them is one line, exit 2."""
    x, y, xt, yt = CASES["zero-one matrix"][:4]
    np.savez(
        tmp_path / "f.npz", x=x, y=y.astype(np.float32), x_test=xt, y_test=yt.astype(np.float32)
    )
    assert load_dataset(f"npz:{tmp_path / 'f.npz'}").task == "regression"
    out = tmp_path / "ml"
    argv = ["train", "--dataset", f"npz:{tmp_path / 'f.npz'}", "--model", "mlp(features=(8,))"]
    assert main([*argv, "--task", "multilabel", "--epochs", "1", "--out", str(out)]) == 0
    assert "test_label_accuracy" in json.loads((out / "summary.json").read_text())
    npz, _ = _write(tmp_path, "labels")
    out = tmp_path / "reg"
    argv = ["train", "--dataset", npz, "--model", "mlp(features=(8,))", "--task", "regression"]
    assert main([*argv, "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["num_params"] == 8 * 8 + 8 + 8 + 1
    capsys.readouterr()
    bad = tmp_path / "bad"
    argv = ["train", "--dataset", f"npz:{tmp_path / 'f.npz'}", "--task", "segmentation"]
    assert main([*argv, "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "the segmentation task reads labels per position of the inputs (8,)" in err
    assert not bad.exists()


def test_labels_saved_as_whole_reals_are_labels_with_task_classification(tmp_path):
    """Reals are a regression by their kind; ``--task classification`` reads whole-number
    reals (``0.0, 1.0``, as pandas writes labels) as the integer labels they are (it was
    refused, so such a file had to be written again), and refuses other reals."""
    x, y, xt, yt = CASES["labels"][:4]
    np.savez(tmp_path / "f.npz", x=x, y=y.astype(np.float64), x_test=xt, y_test=yt * 1.0)
    loaded = load_dataset(f"npz:{tmp_path / 'f.npz'}")
    assert loaded.task == "regression"
    data = for_task(loaded, "classification")
    assert (data.task, data.num_classes, data.y_train.dtype) == ("classification", 2, np.int32)
    np.testing.assert_array_equal(data.y_train, y)
    np.testing.assert_array_equal(data.y_test, yt)
    np.savez(tmp_path / "h.npz", x=x, y=y + 0.5, x_test=xt, y_test=yt * 1.0)
    with pytest.raises(ConfigError, match=r"reads integer labels \(or reals holding whole"):
        for_task(load_dataset(f"npz:{tmp_path / 'h.npz'}"), "classification")


def test_negative_whole_number_labels_are_classes_named_by_their_values(tmp_path):
    """-1/+1 labels (LIBSVM's two classes) are numbered in the order of their values, as
    scikit-learn's LabelEncoder numbers them, their values the class names: in an npz file
    by their kind, in a CSV table (a regression by default) with --task classification."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    y = np.where(x[:, 0] > 0, 1, -1)
    np.savez(tmp_path / "f.npz", x=x[:20], y=y[:20], x_test=x[20:], y_test=y[20:])
    data = load_dataset(f"npz:{tmp_path / 'f.npz'}")
    assert (data.task, data.num_classes, data.classes) == ("classification", 2, ("-1", "1"))
    np.testing.assert_array_equal(data.y_train, (y[:20] + 1) // 2)
    np.testing.assert_array_equal(data.y_test, (y[20:] + 1) // 2)
    rows = "".join(f"{a},{b},{c},{t}\n" for (a, b, c), t in zip(x, y * 5, strict=True))
    (tmp_path / "t.csv").write_text("a,b,c,label\n" + rows)
    table = load_dataset(f"csv:{tmp_path / 't.csv'}")
    assert table.task == "regression"
    named = for_task(table, "classification")
    assert (named.num_classes, named.classes) == (2, ("-5", "5"))
    labels = np.concatenate([named.y_train, named.y_test])
    assert sorted(np.unique(labels).tolist()) == [0, 1] and labels.dtype == np.int32


@pytest.mark.parametrize(
    ("y", "yt", "message"),
    [
        (np.zeros((10, 2, 2), np.int32), np.zeros((4, 2, 2), np.int32), "none of: labels"),
        (
            np.arange(10) - 3,
            np.arange(4) + 7,
            r"y_test holds label\(s\) \[7, 8, 9, 10\] that the training labels \(-3, -2, .*\) lack",
        ),
        (np.zeros(10, np.complex64), np.zeros(4, np.complex64), "got dtype complex64"),
        (np.zeros(10, np.int32), np.zeros(4, np.float32), "must be of one kind"),
    ],
)
def test_targets_of_no_task_are_refused_naming_the_file(tmp_path, y, yt, message):
    x, xt = np.zeros((10, 8), np.float32), np.zeros((4, 8), np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=y, x_test=xt, y_test=yt)
    with pytest.raises(ConfigError, match=message) as e:
        load_dataset(f"npz:{tmp_path / 'f.npz'}")
    assert "f.npz" in str(e.value)


def test_complex_inputs_are_refused(tmp_path):
    x = np.zeros((10, 8), np.complex64)
    np.savez(tmp_path / "f.npz", x=x, y=np.zeros(10, np.int32), x_test=x, y_test=np.zeros(10))
    with pytest.raises(
        ConfigError, match=r"x must be numeric \(integer or real\); got dtype complex64"
    ):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")


def test_an_npz_mask_leaves_the_masked_positions_out(tmp_path, capsys):
    """Per-position targets with ``mask``/``mask_test``: the labels at masked positions
    change nothing (two files differing only there give the same run, to the bit)."""
    x, y, xt, yt = CASES["per position"][:4]
    m, mt = np.ones_like(y), np.ones_like(yt)
    m[:, :3], mt[:, :3] = 0, 0
    summaries = []
    for fill in (0, 2):
        y2, yt2 = y.copy(), yt.copy()
        y2[:, :3], yt2[:, :3] = fill, fill
        path = tmp_path / f"seg{fill}.npz"
        np.savez(path, x=x, y=y2, x_test=xt, y_test=yt2, mask=m, mask_test=mt)
        out = tmp_path / f"run{fill}"
        argv = ["train", "--dataset", f"npz:{path}", "--model", CASES["per position"][-1]]
        assert main([*argv, "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
        if fill == 0:  # the same arrays as shards with a mask field: the same run
            for split, arrays in (("train", (x, y2, m)), ("test", (xt, yt2, mt))):
                fields = dict(zip(("x", "y", "mask"), arrays, strict=True))
                write_shards(tmp_path / "shards" / split, fields, shard_size=50)
            out = tmp_path / "run-shards"
            argv[2] = f"shards:{tmp_path / 'shards'}"
            assert main([*argv, "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
            summaries.append(json.loads((out / "summary.json").read_text()))
    a, shards, b = summaries
    assert a["test_loss"] == b["test_loss"] and a["test_pixel_accuracy"] == b["test_pixel_accuracy"]
    assert shards["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    np.savez(tmp_path / "bad.npz", x=x, y=y, x_test=xt, y_test=yt, mask=m)
    with pytest.raises(ConfigError, match="give both mask and mask_test"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    x, y, xt, yt = CASES["labels"][:4]
    np.savez(tmp_path / "cls.npz", x=x, y=y, x_test=xt, y_test=yt, mask=y, mask_test=yt)
    with pytest.raises(ConfigError, match="the classification task reads no mask"):
        load_dataset(f"npz:{tmp_path / 'cls.npz'}")
    capsys.readouterr()


def test_shards_of_another_width_or_with_nan_are_one_line_naming_the_shard(tmp_path, capsys):
    x, y, xt, yt = CASES["labels"][:4]
    write_shards(tmp_path / "w" / "train", {"x": x, "y": y}, shard_size=50)
    write_shards(tmp_path / "w" / "test", {"x": xt, "y": yt}, shard_size=50)
    np.save(tmp_path / "w" / "train" / "x-00001.npy", np.zeros((50, 9), np.float32))
    with pytest.raises(ConfigError, match=r"x-00001.npy' holds x examples of shape \(9,\)"):
        load_shards(f"shards:{tmp_path / 'w'}")
    bad = x.copy()
    bad[70, 3] = np.nan  # shard 1 (rows 50..99), row 20
    write_shards(tmp_path / "n" / "train", {"x": bad, "y": y}, shard_size=50)
    write_shards(tmp_path / "n" / "test", {"x": xt, "y": yt}, shard_size=50)
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"shards:{tmp_path / 'n'}", "--val-fraction", "0.1"]
    assert main([*argv, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "hold NaN or inf, first in shard" in err and "x-00001.npy', row 20" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_ensembles_and_searches_train_alike_in_memory_streamed_and_from_shards(tmp_path):
    """An ensemble and a search's side-by-side trials read the same batches from arrays in
    memory, from those arrays streamed (``stream=True``), and from shards on disk: the
    same members to the bit and the same trial scores (each once took the in-memory path
    only: a traceback, or "batch_size is required")."""
    import jtricks
    from jtricks.search import SearchSettings, search

    npz, shards = _write(tmp_path, "labels")
    common = dict(model="mlp(features=(8,))", batch_size=20, epochs=2, seed=3)
    runs = [
        jtricks.train(dataset=spec, stream=stream, ensemble=2, **common)
        for spec, stream in ((npz, False), (npz, True), (shards, False))
    ]
    for run in runs[1:]:
        jax.tree.map(np.testing.assert_array_equal, runs[0].state.params, run.state.params)
        for key, value in runs[0].test.items():  # shards' test batches sum in another order
            assert run.test[key] == pytest.approx(value, rel=1e-6), key
    settings = SearchSettings("lr=loguniform(1e-3, 1e-1)", 2, "random", 2)
    scores = []
    for spec in (npz, shards):  # shards stream through the path --stream takes
        config = jtricks.TrainConfig(dataset=spec, **common)
        scores.append([r["score"] for r in search(config, settings).records])
    assert scores[1] == pytest.approx(scores[0], rel=1e-6) and len(scores[0]) == 2
    with pytest.raises(ConfigError, match="jtricks train and search stream"):
        load_dataset(shards)  # diagnose's reading: it needs a dataset in memory


def test_an_npz_validation_split_is_the_one_validated_on(tmp_path, capsys):
    """``x_val``, ``y_val`` in the file: training takes every row of ``x`` (none carved
    off), validation is the file's split scaled with the training rows' statistics (by
    hand: one mean and std over all features), and the run equals the same arrays as
    shards with a ``val/`` folder (the second path). Half a pair, or a ``val_fraction``
    it would not use, is one line."""
    from jtricks.run.config import TrainConfig
    from jtricks.run.data import load_run_data

    x, y, xt, yt = CASES["labels"][:4]
    xv, yv = xt[:20] + 0.5, yt[:20]
    path = tmp_path / "v.npz"
    np.savez(path, x_train=x, y_train=y, x_val=xv, y_val=yv, x_test=xt[20:], y_test=yt[20:])
    data = load_run_data(TrainConfig(dataset=f"npz:{path}"))
    assert data.n_train == len(x)
    mean, std = x.astype(np.float64).mean(), x.astype(np.float64).std()  # one scalar each
    np.testing.assert_allclose(data.val[0], (xv - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.val[1], yv)
    summaries = []
    for spec in (f"npz:{path}", f"shards:{tmp_path / 'shards'}"):
        if spec.startswith("shards"):
            for split, arrays in (
                ("train", (x, y)),
                ("val", (xv, yv)),
                ("test", (xt[20:], yt[20:])),
            ):
                write_shards(
                    tmp_path / "shards" / split, dict(zip("xy", arrays, strict=True)), shard_size=50
                )
        out = tmp_path / spec[:5]
        argv = ["train", "--dataset", spec, "--model", "mlp(features=(8,))", "--epochs", "2"]
        assert main([*argv, "--batch-size", "20", "--no-progress", "--out", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    assert summaries[1]["val_loss"] == pytest.approx(summaries[0]["val_loss"], rel=1e-4)
    assert summaries[1]["test_loss"] == pytest.approx(summaries[0]["test_loss"], rel=1e-4)
    np.savez(tmp_path / "half.npz", x=x, y=y, x_val=xv, x_test=xt, y_test=yt)
    with pytest.raises(ConfigError, match=r"lacks array\(s\) \['y_val'\]"):
        load_dataset(f"npz:{tmp_path / 'half.npz'}")
    assert main(["train", "--dataset", f"npz:{path}", "--val-fraction", "0.2"]) == 2
    assert "brings its own validation split" in capsys.readouterr().err


def test_a_run_of_targets_far_from_zero_reports_their_r2(tmp_path, monkeypatch):
    """Targets 3000 +- 1 (their float32 squares hold no spread): the run's task is centered
    on the training split's targets (every process's on the whole split's), and the
    summary's test ``r2`` is the float64 formula on the loaded run's predictions."""
    import jtricks
    from jtricks.run.build import build
    from jtricks.run.config import TrainConfig
    from jtricks.run.data import load_run_data
    from jtricks.run.runner import share_processes

    x, xt = X, XT
    y, yt = 3000 + (x @ W[:, :1]), 3000 + (xt @ W[:, :1])
    path = tmp_path / "far.npz"
    np.savez(path, x=x, y=y.astype(np.float32), x_test=xt, y_test=yt.astype(np.float32))
    config = TrainConfig(dataset=f"npz:{path}", model="mlp(features=(8,))", epochs=1)
    data = load_run_data(config)
    whole = data.train[1].astype(np.float64).mean(0)
    assert build(config, data, None, False).task.center == pytest.approx(tuple(whole))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    share_processes(config, data, None, None)
    assert build(config, data, None, False).task.center == pytest.approx(tuple(whole))
    monkeypatch.undo()
    out = tmp_path / "run"
    jtricks.train(config, out=out, batch_size=20)
    p = jtricks.load_run(out).predict(xt).astype(np.float64)
    t = yt.astype(np.float32).astype(np.float64)
    r2 = 1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_r2"] == pytest.approx(r2, rel=1e-4)  # far off: the model is poor


def test_standardized_targets_fit_far_from_zero_and_predict_in_their_units(tmp_path, capsys):
    """Targets 3000 +- 2 on one output, -40 +- 10 on another: with ``--target-scale
    standardize`` the run learns them (test ``r2`` near 1; unscaled, an Adam step cannot
    reach 3000 and ``r2`` is far below 0); ``config.json`` records the training rows' mean
    and std (float64 by hand); `load_run`'s and ``train``'s predictions are in the targets'
    units and score the summary's test ``mse`` and ``r2`` (float64, scikit-learn). A task
    other than regression, or targets on disk, is one line and exit 2."""
    from sklearn.metrics import r2_score

    import jtricks
    from jtricks.run.config import TrainConfig
    from jtricks.run.data import load_run_data

    offset, spread = np.array([3000.0, -40.0]), np.array([2.0, 10.0])
    y, yt = (offset + spread * (X @ W[:, :2]) / 3), (offset + spread * (XT @ W[:, :2]) / 3)
    path = tmp_path / "far.npz"
    np.savez(path, x=X, y=y.astype(np.float32), x_test=XT, y_test=yt.astype(np.float32))
    r2s = {}
    for scale in ("none", "standardize"):
        config = TrainConfig(dataset=f"npz:{path}", model="mlp(features=(16,))", epochs=40)
        r2s[scale] = jtricks.train(config, out=tmp_path / scale, batch_size=20, target_scale=scale)
    assert r2s["none"].test["r2"] < 0 < 0.9 < r2s["standardize"].test["r2"]
    out = tmp_path / "standardize"
    rows = load_run_data(TrainConfig(dataset=f"npz:{path}")).train[1].astype(np.float64)
    mean, std = json.loads((out / "config.json").read_text())["target_scale"]
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, rows.std(0), rtol=1e-12)
    p = jtricks.load_run(out).predict(XT).astype(np.float64)
    t = yt.astype(np.float32).astype(np.float64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_mse"] == pytest.approx(((p - t) ** 2).mean(), rel=1e-4)
    assert summary["test_r2"] == pytest.approx(r2_score(t, p), rel=1e-4)
    np.testing.assert_allclose(r2s["standardize"].predict(XT), p, rtol=1e-6)
    np.savez(path, x=X, y=2 * y.astype(np.float32), x_test=XT, y_test=yt.astype(np.float32))
    again = jtricks.load_run(out).predict(XT)  # the recorded scale, not one of the new file
    np.testing.assert_allclose(again, p, rtol=1e-6)
    write_shards(tmp_path / "shards" / "train", {"x": X, "y": y.astype(np.float32)})
    write_shards(tmp_path / "shards" / "test", {"x": XT, "y": yt.astype(np.float32)})
    for dataset, needle in (
        ("mnist1d(num_samples=200)", "standardizes regression targets; this run's task is cl"),
        (f"shards:{tmp_path / 'shards'}", "needs the training targets in memory"),
    ):
        bad = tmp_path / "bad"
        argv = ["train", "--dataset", dataset, "--target-scale", "standardize"]
        assert main([*argv, "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and not bad.exists()
