"""Run identity: every checkpoint records the id of the run that wrote it (drawn when the
run folder is created) and its config; ``--resume`` never restores another run's
checkpoint: it falls back to the run's own newest one with a one-line warning naming
what it skipped, or exits 2 in one line."""

from __future__ import annotations

import json
import shutil

import orbax.checkpoint as ocp
import pytest

from jtricks.cli import main
from jtricks.run.resume import foreign_checker, run_identity
from jtricks.training.checkpoint import list_checkpoints, read_meta

ARGS = [
    "train",
    "--dataset",
    "synthetic(num_train=200, num_test=40, shape=(8,), num_classes=3)",
    "--model",
    "mlp(features=(8,))",
    "--batch-size",
    "20",
    "--epochs",
    "4",
    "--checkpoint-every",
    "1",
    "--keep-checkpoints",
    "4",
    "--no-progress",
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished runs of the same settings but the seed."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "0"), ("b", "1")):
        assert main([*ARGS, "--seed", seed, "--out", str(root / name)]) == 0
    return root


def _params(run, name):
    ck = ocp.StandardCheckpointer()
    arrays = ck.restore((run / "checkpoints" / name / "state").absolute())
    ck.close()
    return arrays["params"]


def _cut(two_runs, tmp_path, keep):
    """Run b cut after epoch ``keep`` (its later checkpoints removed), with run a's epoch-4
    checkpoint copied in: what a careless copy between run folders leaves."""
    b = tmp_path / "b"
    shutil.copytree(two_runs / "b", b)
    (b / "summary.json").unlink()
    for ck in list_checkpoints(b / "checkpoints"):
        if int(ck.name.split("-")[1]) > keep:
            shutil.rmtree(ck)
    shutil.copytree(
        two_runs / "a" / "checkpoints" / "epoch-000004", b / "checkpoints" / "epoch-000004"
    )
    return b


def test_every_checkpoint_records_its_runs_identity(two_runs):
    a, b = run_identity(two_runs / "a"), run_identity(two_runs / "b")
    assert a["id"] != b["id"] and a["fingerprint"] != b["fingerprint"]  # another seed
    for ck in list_checkpoints(two_runs / "a" / "checkpoints"):
        assert read_meta(ck)["run"] == a


def test_resume_skips_another_runs_checkpoint_and_continues_its_own_exactly(
    two_runs, tmp_path, capsys
):
    b = _cut(two_runs, tmp_path, keep=2)
    capsys.readouterr()
    assert main(["train", "--resume", str(b), "--no-progress"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "another run's checkpoint" in line]
    assert (
        len(warning) == 1 and "epoch-000004" in warning[0] and "restored epoch-000002" in warning[0]
    )
    resumed, original = _params(b, "epoch-000004"), _params(two_runs / "b", "epoch-000004")
    for layer in original:  # the run's own result, not run a's
        for leaf in original[layer]:
            assert (resumed[layer][leaf] == original[layer][leaf]).all()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (b, two_runs / "b")]
    assert summaries[0]["test_loss"] == summaries[1]["test_loss"]


def test_resume_with_only_another_runs_checkpoints_exits_2_in_one_line(two_runs, tmp_path, capsys):
    b = _cut(two_runs, tmp_path, keep=0)
    capsys.readouterr()
    assert main(["train", "--resume", str(b), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "epoch-000004 is another run's checkpoint (written by run" in err
    assert list_checkpoints(b / "checkpoints")[-1].name == "epoch-000004"  # nothing deleted


def test_a_checkpoint_without_an_id_is_judged_by_its_settings():
    why = foreign_checker({"id": "1", "fingerprint": "f"}, {"seed": 0, "lr": 0.1})
    assert why({"run": {"id": "1"}, "config": {"seed": 0, "lr": 0.1}}) is None
    assert why({"config": {"seed": 0, "lr": 0.1}}) is None  # an older jtricks wrote it
    assert why({"config": {"seed": 1, "lr": 0.1}}) == "its settings differ: seed: 1 there, 0 here"
    assert "written by run 2" in why({"run": {"id": "2"}, "config": {"seed": 0, "lr": 0.1}})


def test_a_setting_added_since_the_run_started_differs_only_away_from_its_default():
    """A checkpoint written before ``target_scale`` existed: its config lacks the key.
    At the default here it is the same run (an older folder loads and resumes); set
    otherwise it is not."""
    from jtricks.run.config import TrainConfig

    before = TrainConfig().to_dict()
    del before["target_scale"]
    same = foreign_checker(None, TrainConfig().to_dict())
    assert same({"config": before}) is None
    other = foreign_checker(None, TrainConfig(target_scale="standardize").to_dict())
    assert other({"config": before}) == (
        "its settings differ: target_scale: 'none' there, 'standardize' here"
    )
