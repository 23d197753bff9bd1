"""Checkpoints, exact resume after SIGKILL, and damaged checkpoints (T08)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jtricks
from jtricks.cli import main
from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.training import create_train_state
from jtricks.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    restore,
    restore_latest,
    save,
)

HERE = Path(__file__).parent
ARGS = [
    "--dataset",
    "synthetic(num_train=300, num_test=50, shape=(8,), num_classes=3, noise=2.0)",
    "--model",
    "mlp(features=(16,), dropout=0.2)",
    "--optimizer",
    "momentum | clip_global_norm(1.0)",
    "--lr",
    "0.05",
    "--schedule",
    "cosine",
    "--batch-size",
    "25",
    "--epochs",
    "12",
    "--checkpoint-every",
    "2",
    "--no-progress",
]


def _final_params(run: Path):
    import orbax.checkpoint as ocp

    last = list_checkpoints(run / "checkpoints")[-1]
    ckptr = ocp.StandardCheckpointer()
    arrays = ckptr.restore(last.absolute() / "state")
    ckptr.close()
    return last.name, arrays


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    return out


def _killed_run(tmp_path, mode, epoch):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fault_driver.py"),
            mode,
            str(epoch),
            "--",
            *ARGS,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "summary.json").exists()
    return out


def _assert_same_final(a: Path, b: Path):
    name_a, pa = _final_params(a)
    name_b, pb = _final_params(b)
    assert name_a == name_b == "epoch-000012"
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical
    ra = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == list(range(1, 13))
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    out = _killed_run(tmp_path, "epoch", 7)
    # epoch 7 is dispatched before epoch 6's record is read (the loop runs ahead of its
    # callbacks), and checkpoints are written by a background thread: epoch 4's may still
    # be in flight
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] in (
        "epoch-000002",
        "epoch-000004",
    )
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_final(reference, out)


def test_sigkill_during_checkpoint_save_then_resume_is_bit_identical(tmp_path, reference):
    out = _killed_run(tmp_path, "save", 6)
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-epoch-000006").exists()  # the half-written save was never committed
    assert [p.name for p in list_checkpoints(ckpts)][-1] == "epoch-000004"
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    _assert_same_final(reference, out)


def test_corrupt_latest_checkpoint_falls_back_with_a_named_error(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    latest = list_checkpoints(out / "checkpoints")[-1]
    victim = max(
        (p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncate
    state = create_train_state(
        MLP(num_classes=3, features=(16,), dropout=0.2),
        optax.sgd(0.1),
        np.zeros((1, 8)),
        jax.random.key(0),
    )
    with pytest.raises(CheckpointError, match=str(victim)):
        restore(latest, state)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "truncated" in err and str(victim) in err and "skipped 1 damaged checkpoint(s)" in err
    _assert_same_final(reference, out)


def test_checkpoint_that_does_not_match_the_model(tmp_path, reference):
    wrong = create_train_state(
        MLP(num_classes=3, features=(32,)), optax.sgd(0.1), np.zeros((1, 8)), jax.random.key(0)
    )
    with pytest.raises(CheckpointError, match="does not match"):
        restore_latest(reference / "checkpoints", wrong)


@pytest.mark.parametrize("optimizer", ["adam | clip_global_norm(1.0)", "contrib.galore"])
def test_save_and_restore_roundtrip(tmp_path, key, optimizer):
    """Every leaf comes back: typed keys, and leaves of no size (GaLore's (0, 0) projector
    of each 1-D parameter, which orbax refuses to write: such runs once failed at their
    first checkpoint)."""
    model = MLP(num_classes=3, features=(4,), norm="batch")
    state = create_train_state(model, jtricks.build_optimizer(optimizer, 0.1), np.ones((2, 5)), key)
    state = state.replace(opt_state=jax.tree.map(lambda a: a + 1, state.opt_state))  # not init
    save(tmp_path, "epoch-000001", state, {"epoch": 1, "history": []})
    target = create_train_state(
        model, jtricks.build_optimizer(optimizer, 0.1), np.ones((2, 5)), jax.random.key(9)
    )
    restored, meta = restore(tmp_path / "epoch-000001", target)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(
            jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
            jax.random.key_data(b) if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key) else b,
        )
    assert meta["epoch"] == 1
    assert any(a.size == 0 for a in jax.tree.leaves(state.opt_state)) == ("galore" in optimizer)


@pytest.mark.parametrize(
    ("setup", "args", "match"),
    [
        (None, ["--resume", "{tmp}/nothing"], "not a jtricks run folder"),
        ("file", ["--resume", "{tmp}/a-file"], "it is a file, not a run folder"),
        ("finished", ["--resume", "{run}"], "already finished (summary.json exists); to train"),
        ("badjson", ["--resume", "{run}"], "not a valid run config"),
        ("partial", ["--resume", "{run}", "--model", "mlp"], "do not also give --model"),
    ],
)
def test_bad_resume_requests(tmp_path, reference, capsys, setup, args, match):
    run = tmp_path / "run"
    (tmp_path / "a-file").write_text("not a run")
    if setup and setup != "file":
        shutil.copytree(reference, run)
        if setup != "finished":
            (run / "summary.json").unlink()
        if setup == "badjson":
            (run / "config.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path, run=run) for a in args]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_python_api_resume_rejects_extra_settings(reference):
    with pytest.raises(ConfigError, match="give no other settings"):
        jtricks.train(resume=reference, model="cnn")


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path, capsys):
    """A run records the digest of its data; ``--resume`` after one training example
    changed is refused in one line (it once went on training on the new data without a
    word), and goes on once the data are restored (a copy of the file: content, not
    time). ``load_run`` scales inputs with the scaler the run recorded, not one fitted
    again on the changed data."""
    rng = np.random.default_rng(0)
    arrays = dict(
        x=rng.normal(size=(60, 4)).astype(np.float32), y=rng.integers(0, 3, 60),
        x_test=rng.normal(size=(12, 4)).astype(np.float32), y_test=rng.integers(0, 3, 12),
    )  # fmt: skip
    data, kept = tmp_path / "data.npz", tmp_path / "kept.npz"
    np.savez(data, **arrays)
    shutil.copy(data, kept)
    run = tmp_path / "run"
    config = dict(dataset=f"npz:{data}", model="mlp(features=(8,))", batch_size=18, epochs=1)
    jtricks.train(**config, out=run)
    recorded = json.loads((run / "config.json").read_text())["data_sha256"]
    (run / "summary.json").unlink()  # as if stopped after its last checkpoint
    before = jtricks.load_run(run)
    own = jtricks.run.data.load_run_data(before.config).scaler  # recorded exactly, as JSON
    np.testing.assert_array_equal(own(arrays["x_test"]), before.inputs(arrays["x_test"]))
    changed = arrays["x"].copy()
    changed[:, 0] += 50.0  # every row: in the training rows whatever the split
    np.savez(data, **{**arrays, "x": changed})
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the data of dataset 'npz:{data}' differ from those it started with" in err
    assert f"SHA-256 {recorded[:12]}... then" in err and "Traceback" not in err
    after = jtricks.load_run(run)
    refit = jtricks.run.data.load_run_data(after.config).scaler
    assert not np.array_equal(refit(arrays["x_test"]), before.inputs(arrays["x_test"]))
    np.testing.assert_array_equal(after.inputs(arrays["x_test"]), before.inputs(arrays["x_test"]))
    shutil.copy(kept, data)
    assert jtricks.train(resume=run).history.records[-1]["epoch"] == 1
