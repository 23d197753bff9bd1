"""Training a run on past its end (`jtricks.run.extend`): ``--resume RUN --steps N`` ends
where a run started with N steps ends, bit for bit, with that run's records; what cannot
go on is refused in one line, before anything in the folder changes."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest

import jtricks
from jtricks.cli import main
from jtricks.run.extend import record_extension

# 108 training examples (120 less the validation tenth) in batches of 16: 6 steps an epoch
BASE = [
    "train",
    "--dataset",
    "synthetic(num_train=120, num_test=30, shape=(8,), num_classes=3)",
    "--model",
    "mlp(features=(8,))",
    "--batch-size",
    "16",
    "--log-every-steps",
    "4",
    "--no-progress",
]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _params(run):
    return [np.asarray(a) for a in jax.tree.leaves(jtricks.load_run(run).state.params)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run of 8 steps (its last epoch cut at 2 of 6), the same trained on to
    15, and a run started with 15."""
    root = tmp_path_factory.mktemp("extend")
    short, longer = root / "short", root / "longer"
    assert main([*BASE, "--steps", "8", "--out", str(short)]) == 0
    pristine = root / "pristine"
    shutil.copytree(short, pristine)
    assert main(["train", "--resume", str(short), "--steps", "15", "--no-progress"]) == 0
    assert main([*BASE, "--steps", "15", "--out", str(longer)]) == 0
    return short, longer, pristine


def test_a_run_trained_on_ends_as_one_started_that_long(runs):
    extended, longer, _ = runs
    for a, b in zip(_params(extended), _params(longer), strict=True):
        np.testing.assert_array_equal(a, b)
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in runs[:2])
    for key in ("test_loss", "test_accuracy", "val_loss", "steps", "epochs"):
        assert summary[key] == expected[key], key
    assert (extended / "steps.jsonl").read_text() == (longer / "steps.jsonl").read_text()


def test_the_epoch_the_old_end_cut_is_recorded_once_whole(runs):
    extended, longer, _ = runs
    got, want = _lines(extended / "metrics.jsonl"), _lines(longer / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in got] == [(1, 6), (2, 12), (3, 15)]
    assert [(r["epoch"], r["step"]) for r in want] == [(1, 6), (2, 12), (3, 15)]
    for r, w in zip(got, want, strict=True):
        for key in ("train_loss", "train_accuracy", "lr", "val_loss", "train_param_norm"):
            # epoch 2 merges the 2 steps before the old end with the 4 after it: float32
            # sums on the device then, float64 means times steps now
            np.testing.assert_allclose(r[key], w[key], rtol=1e-6, err_msg=f"{r['epoch']} {key}")


def test_the_config_records_the_new_length_and_the_extension(runs):
    extended, _, pristine = runs
    saved = json.loads((extended / "config.json").read_text())
    before = json.loads((pristine / "config.json").read_text())
    assert saved["config"]["steps"] == 15 and before["config"]["steps"] == 8
    assert saved["run"] == before["run"]  # the same run
    [entry] = saved["extended"]
    assert entry["from"] == {"epochs": None, "steps": 8}
    assert entry["to"] == {"epochs": None, "steps": 15}
    assert saved["config_sha256"] != before["config_sha256"]
    assert jtricks.load_run(extended).step == 15  # the digest is the config's: it loads


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--steps", "8"], "steps=8 does not train run .* on: it has steps=8; give more than 8"),
        (["--epochs", "4"], r"counts steps \(steps=8\); to train it on, give steps"),
        (["--steps", "20", "--lr", "0.1"], "do not also give --lr"),
    ],
    ids=["not-longer", "other-length", "other-setting"],
)
def test_what_does_not_train_on_is_one_line_and_changes_nothing(
    runs, tmp_path, capsys, args, match
):
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(match, err), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        (["--schedule", "cosine"], "its schedule 'cosine' is laid over the whole run"),
        (["--early-stopping", "2"], "it stops early (--early-stopping)"),
        (["--swa", "1"], "its end holds SWA's average (--swa)"),
    ],
    ids=["cosine", "early-stopping", "swa"],
)
def test_runs_whose_end_is_more_than_their_length_are_refused(tmp_path, capsys, settings, why):
    run = tmp_path / "run"
    assert main([*BASE, "--epochs", "2", *settings, "--out", str(run)]) == 0
    summary = (run / "summary.json").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cannot train {str(run)!r} on past its end: " in err and why in err
    assert f"--pretrained {run}" in err
    assert (run / "summary.json").read_text() == summary


def test_a_diverged_run_is_refused_and_a_finished_one_names_the_way_on(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "diverged": True}))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "20", "--no-progress"]) == 2
    assert "on past its end: it diverged; start a new run" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        "already finished" in err and "give the longer length too (--epochs N or --steps N)" in err
    )


def test_the_python_api_trains_a_run_on(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    result = jtricks.train(resume=run, steps=15)
    assert result.history[-1]["step"] == 15 and len(result.history.records) == 3
    for a, b in zip(_params(run), _params(runs[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(jtricks.ConfigError, match="but epochs or steps"):
        jtricks.train(resume=run, steps=20, seed=3)


def test_a_stream_run_trained_on_reads_on_from_where_it_ended(runs, tmp_path):
    short, longer = tmp_path / "short", tmp_path / "longer"
    assert main([*BASE, "--stream", "--steps", "8", "--out", str(short)]) == 0
    assert main(["train", "--resume", str(short), "--steps", "15", "--no-progress"]) == 0
    assert main([*BASE, "--stream", "--steps", "15", "--out", str(longer)]) == 0
    for a, b in zip(_params(short), _params(longer), strict=True):
        np.testing.assert_array_equal(a, b)
    got, want = _lines(short / "metrics.jsonl"), _lines(longer / "metrics.jsonl")
    assert [r["data_state"] for r in got] == [r["data_state"] for r in want]


def test_an_extension_cut_before_its_first_checkpoint_resumes_as_the_longer_run(runs, tmp_path):
    """The new length was written (config.json), then the process died before a
    checkpoint: ``--resume`` alone goes on from the old end's checkpoint as the longer run,
    its cut epoch recorded once, whole (the checkpoint's own length says it was shorter)."""
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    saved = json.loads((run / "config.json").read_text())["config"]
    assert record_extension(run, {**saved, "steps": 15})  # what the extension wrote first
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    got, want = _lines(run / "metrics.jsonl"), _lines(runs[1] / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in got] == [(1, 6), (2, 12), (3, 15)]
    np.testing.assert_allclose([r["train_loss"] for r in got], [r["train_loss"] for r in want])
    for a, b in zip(_params(run), _params(runs[1]), strict=True):
        np.testing.assert_array_equal(a, b)


class _StopAfter:
    """A stop flag set at its ``n``-th look (`fit` looks between programs)."""

    def __init__(self, n: int) -> None:
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_an_interrupted_run_trained_on_ends_as_one_started_that_long(tmp_path):
    settings = dict(
        dataset="synthetic(num_train=120, num_test=30, shape=(8,), num_classes=3)",
        model="mlp(features=(8,))",
        batch_size=16,
        chunk=2,  # epochs of 6 steps in programs of 2: the stop falls mid-epoch
    )
    run = tmp_path / "run"
    with pytest.raises(jtricks.errors.Interrupted):
        jtricks.train(steps=12, out=run, stop=_StopAfter(4), **settings)
    assert not (run / "summary.json").exists()
    jtricks.train(resume=run, steps=15)
    jtricks.train(steps=15, out=tmp_path / "longer", **settings)
    for a, b in zip(_params(run), _params(tmp_path / "longer"), strict=True):
        np.testing.assert_array_equal(a, b)
    got, want = (_lines(r / "metrics.jsonl") for r in (run, tmp_path / "longer"))
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want]
