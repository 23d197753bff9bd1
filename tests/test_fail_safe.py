"""Fail safe: one writer per run folder, sizes and paths checked before XLA or the disk
sees them, and one-line messages for every user error."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.rundir import create_run_dir, locked
from jtricks.training import create_train_state, fit

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.readline()
"""


def _npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x=rng.normal(size=(60, 6)).astype(np.float32),
        y=rng.integers(0, 3, 60),
        x_test=rng.normal(size=(20, 6)).astype(np.float32),
        y_test=rng.integers(0, 3, 20),
    )
    return ["--dataset", f"npz:{path}", "--model", "mlp(features=(4,))", "--batch-size", "8"]


def test_a_folder_another_process_writes_is_refused(tmp_path, capsys):
    """Another process (here a plain Python one) holds the run folder: a second --resume
    and a new run into the same folder both exit 2 before reading or writing anything."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "argument --resume: run folder" in err and "in use by another jtricks process" in err
        empty = tmp_path / "empty"
        empty.mkdir()
        with locked(empty):  # the same lock from this process, on another descriptor
            assert main(["train", *_npz(tmp_path), "--epochs", "1", "--out", str(empty)]) == 2
        assert "in use by another jtricks process" in capsys.readouterr().err
        assert list(empty.iterdir()) == []
    finally:
        holder.communicate(b"\n", timeout=30)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # nothing read or written
    with locked(run):  # released when its holder ended: a crashed run leaves no stale lock
        pass


def test_create_run_dir_rechecks_emptiness_under_the_lock(tmp_path, monkeypatch):
    """A run that wrote into the folder between the emptiness check and the lock (a
    descheduled process) is noticed once the lock is held."""
    import contextlib

    import jtricks.rundir as rundir

    real = rundir._refuse_non_empty
    calls = []

    def late_writer(path):
        calls.append(path)
        real(path)
        if len(calls) == 1:  # the other run writes now
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")

    monkeypatch.setattr(rundir, "_refuse_non_empty", late_writer)
    with contextlib.ExitStack() as stack, pytest.raises(ConfigError, match="not empty"):
        create_run_dir(tmp_path / "run", stack)


def test_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default runs/ folder would appear
    base = ["train", *_npz(tmp_path), "--epochs", "1"]
    assert main([*base, "--out", ""]) == 2  # no longer runs/train-<time>
    err = capsys.readouterr().err
    assert "argument --out: out must name a folder; got an empty string" in err
    with pytest.raises(SystemExit) as e:  # argparse's own type errors: one line, status 2
        main([*base, "--lr", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        "argument --lr/--learning-rate: invalid float value: 'abc' (see jtricks train --help)"
        in err
    )
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert not any(p.name == "runs" for p in tmp_path.iterdir())


def test_paths_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(300))
    cases = [
        (["--out", str(tmp_path / "file")], "is a file"),
        (["--dataset", f"npz:{tmp_path / 'noise.npz'}"], "is not an .npz file"),
        (["--dataset", f"npz:{tmp_path}"], "is a folder; npz:PATH takes one .npz file"),
        (["--dataset", f"mnist:{tmp_path / 'file'}"], "is a file; give the folder"),
    ]
    for args, match in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
        assert main(["train", *_npz(tmp_path), "--epochs", "1", *out, *args]) == 2
        err = capsys.readouterr().err
        assert match in err and "allow_pickle" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_fit_on_features_of_the_wrong_width_names_both_shapes():
    state = create_train_state(
        MLP(num_classes=3, features=(4,)), optax.sgd(0.1), np.zeros((1, 6)), jax.random.key(0)
    )
    with pytest.raises(
        ConfigError, match=r"shape \(5,\) do not fit .* Dense_0/kernel has shape \(6, 4\)"
    ):
        fit(state, (np.zeros((10, 5)), np.zeros(10, np.int32)), batch_size=2, epochs=1)


class _Watch:
    """A callback that needs the state, so `fit` does not pipeline epochs."""

    needs_state = True

    def __init__(self):
        self.records, self.states = [], []

    def on_epoch_end(self, record, state):
        self.records.append(record)
        self.states.append(state)


class _WatchCopy(_Watch):
    """A callback that takes a copy of the state: `fit` dispatches epochs ahead of it."""

    takes_copy = True


@pytest.fixture(scope="module")
def blowup_data():
    from jtricks.data import synthetic

    return synthetic(num_train=120, num_test=40, shape=(8,), num_classes=3, noise=0.3, seed=0)


@pytest.mark.parametrize("callback", [None, _Watch, _WatchCopy])
def test_divergence_stops_inside_the_epoch_and_keeps_a_finite_state(blowup_data, callback):
    """SGD at lr 1e6: the parameters explode (|w| ~ 1e19 before any NaN). Training stops
    after 3 bad steps inside the epoch; the returned state is finite, its step is
    ``history.kept_step``; every epoch that ran is in the history."""
    from jtricks.nn import build_model
    from jtricks.optim import build_optimizer
    from jtricks.training import evaluate

    d = blowup_data
    state = create_train_state(
        build_model("mlp(features=(8,))", 3),
        build_optimizer("sgd", 1e6),
        d.x_train,
        jax.random.key(0),
    )
    watch = callback() if callback is not None else None
    state, history = fit(
        state,
        (d.x_train, d.y_train),
        batch_size=10,
        epochs=5,
        val_data=(d.x_test, d.y_test),
        max_nonfinite=3,
        callbacks=[] if watch is None else [watch],
    )
    last = history.records[-1]
    assert history.diverged and last["diverged"] and "3 consecutive steps" in history.stopped
    assert last["step"] < 12 and last["train_nonfinite"] == 3  # stopped at once, not at epoch end
    assert int(state.step) == history.kept_step <= last["step"]
    assert np.isfinite(float(optax.tree.norm(state.params)))
    kept = evaluate(state, (d.x_test, d.y_test))
    assert np.isfinite(kept["loss"]) and kept["loss"] < 10 * history.records[0]["initial_loss"]
    if watch is not None:
        assert watch.records == history.records  # callbacks saw the stopping epoch too
        assert watch.states[-1] is state  # with the state fit returns


def test_cli_divergence_summary_metrics_and_continuation(tmp_path, capsys):
    base = ["train", *_npz(tmp_path), "--no-progress"]
    run = tmp_path / "run"
    status = main(
        [
            *base,
            "--optimizer",
            "sgd(lr=1e6)",
            "--epochs",
            "5",
            "--max-nonfinite",
            "3",
            "--out",
            str(run),
        ]
    )
    err = capsys.readouterr().err
    assert status == 1 and "kept the state of step" in err and "--pretrained" in err
    import json

    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["diverged"] and records[-1]["diverged"]
    assert summary["epochs"] == len(records) == records[-1]["epoch"]  # the stopping epoch logged
    assert np.isfinite(summary["test_loss"]) and np.isfinite(summary["val_loss"])
    assert summary["val_loss"] < 10 * records[0]["initial_loss"]
    assert (
        main(
            [
                *base,
                "--lr",
                "0.01",
                "--epochs",
                "1",
                "--pretrained",
                str(run),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert main(["train", "--resume", str(run)]) == 2  # finished: continue with --pretrained


@pytest.mark.parametrize("ensemble", ["1", "4"])
def test_max_nonfinite_reaches_fit_alike_for_single_runs_and_ensembles(tmp_path, ensemble):
    """``--max-nonfinite 5`` at lr 1e30: every step from the first overflows the parameters,
    so training stops after exactly 5 skipped steps, an ensemble of 4 as a single run (its
    wiring once kept fit's default of 20)."""
    import json

    run = tmp_path / "run"
    args = ["train", *_npz(tmp_path), "--no-progress", "--optimizer", "sgd", "--lr", "1e30"]
    args += ["--epochs", "5", "--max-nonfinite", "5", "--ensemble", ensemble, "--out", str(run)]
    main(args)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 5 and last["diverged"]
    assert last["train_nonfinite"] == 5 * int(ensemble)  # skipped steps, summed over members


def test_huge_final_loss_warns():
    from jtricks.run.outputs import History
    from jtricks.run.outputs import huge_loss_warning as _huge_loss_warning

    history = History([{"epoch": 1, "step": 5, "initial_loss": 1.1}])
    assert _huge_loss_warning(history, 9e18).startswith("the final test loss 9e+18 is")
    assert _huge_loss_warning(history, 2.0) is None
    assert _huge_loss_warning(History([{"epoch": 1, "step": 5}]), 9e18) is None  # unknown start
    zero = History([{"epoch": 1, "step": 5, "initial_loss": 0.0}])  # an all-zero mask
    assert _huge_loss_warning(zero, 3.0) is None


def test_count_flags_are_bounded_before_anything_is_written(tmp_path, capsys):
    from jtricks.cli import main

    for flag in ("--log-every-steps", "--chunk", "--epochs", "--batch-size"):
        out = tmp_path / flag.strip("-")
        assert main(["train", flag, str(2**31), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "<= 2147483647 (the step counter is an int32 on the device); got 2147483648" in err
        assert "Traceback" not in err
        assert not out.exists()


def _fail_second_checkpoint(monkeypatch):
    """ENOSPC from the checkpoint writer (the background thread) at the second save."""
    import errno

    import jtricks.training.manifest as manifest

    real, calls = manifest._write_json, []

    def write_json(path, obj):
        if path.name == "manifest.json":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(manifest, "_write_json", write_json)


# tensorstore callbacks that arrive after orbax closed its event loop raise "Event loop is
# closed" in their threads; the CLI keeps them off stderr (`QuietThreadTracebacks`, checked
# below through the one-line error), pytest's unraisable-exception hook would still see them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_in_the_checkpoint_writer_stops_with_one_line(tmp_path, capsys, monkeypatch):
    from jtricks.training.checkpoint import list_checkpoints, verify

    run = tmp_path / "run"
    args = ["train", *_npz(tmp_path), "--epochs", "4", "--checkpoint-every", "1", "--no-progress"]
    with monkeypatch.context() as m:
        _fail_second_checkpoint(m)
        assert main([*args, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the epochs' and best/'s managers write in their own threads: either can be second
    written = f"{re.escape(str(run / 'checkpoints'))}/(best/)?epoch-\\d{{6}}"
    assert len(err) == 1, err
    assert re.fullmatch(
        f"jtricks train: error: cannot write checkpoint {written}: No space left on device", err[0]
    ), err
    left = [*(run / "checkpoints").iterdir(), *(run / "checkpoints").glob("best/*")]
    assert not [p for p in left if p.name.startswith(".tmp")]  # no temporary folder
    for ckpt in list_checkpoints(run / "checkpoints"):
        verify(ckpt)  # what was committed is intact
    assert not (run / "summary.json").exists()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # space freed
    assert (run / "summary.json").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_best_write_leaves_the_epochs_write_in_flight_alone(tmp_path, monkeypatch):
    """best/'s writer fails while the epochs' writer is still finishing its checkpoint: the
    failure waits for it before removing temporary folders (it once removed the other
    writer's folder mid-write: a committed checkpoint without its manifest)."""
    import errno
    import time

    import jtricks.training.manifest as manifest
    from jtricks.training.checkpoint import list_checkpoints, verify

    real = manifest._write_json

    def write_json(path, obj):
        if path.name == "manifest.json" and path.parent.parent.name == "best":
            raise OSError(errno.ENOSPC, "No space left on device")
        if path.name == "manifest.json":
            time.sleep(1.0)  # the epochs' write is still in flight when best/'s fails
        real(path, obj)

    run = tmp_path / "run"
    args = ["train", *_npz(tmp_path), "--epochs", "4", "--checkpoint-every", "1", "--no-progress"]
    monkeypatch.setattr(manifest, "_write_json", write_json)
    assert main([*args, "--out", str(run)]) == 1
    committed = list_checkpoints(run / "checkpoints")
    assert committed and not list((run / "checkpoints").glob(".tmp*"))
    for ckpt in committed:
        verify(ckpt)


def test_a_full_disk_for_the_plot_and_the_space_check(tmp_path, capsys, monkeypatch):
    import errno
    from collections import namedtuple

    import jtricks.plotting as run_mod
    import jtricks.training.checkpoint as ckpt

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    args = ["train", *_npz(tmp_path), "--epochs", "2", "--no-progress"]
    with monkeypatch.context() as m:
        real = run_mod.atomic_write
        m.setattr(  # the disk fills while the PNG is written
            run_mod,
            "atomic_write",
            lambda path, write: real(path, no_space if path.suffix == ".png" else write),
        )
        status = main([*args, "--out", str(run)])
    err = capsys.readouterr().err
    assert status == 1 and "cannot write" in err and "No space left on device" in err
    assert "Traceback" not in err and not (run / "summary.json").exists()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10, 10, 100))
    assert main([*args, "--out", str(tmp_path / "full")]) == 1
    assert "No space left on device (the checkpoint needs about" in capsys.readouterr().err


def test_quiet_thread_tracebacks_drops_only_the_closed_loop_noise():
    import io
    import threading

    from jtricks.cli import QuietThreadTracebacks

    out = io.StringIO()
    quiet = QuietThreadTracebacks(out)

    def emit(last):
        quiet.write("Traceback (most recent call last):\n")
        quiet.write('  File "x.py", line 1, in f\n')
        quiet.write(f"{last}\n")

    for last in ("RuntimeError: Event loop is closed", "ValueError: real"):
        t = threading.Thread(target=emit, args=(last,))
        t.start()
        t.join()
    quiet.write("main thread line\n")
    assert out.getvalue() == (
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: real\n'
        "main thread line\n"
    )


def test_an_out_folder_that_holds_anything_is_refused_and_left_as_it_was(tmp_path, capsys):
    """--out naming a folder of the user's files, or a dead run's leftovers, is refused in
    one line and every file stays, byte for byte (the refusal's clean-up emptied it,
    subfolders included, while saying it would not overwrite it), for a run, an ensemble
    and `jtricks.train`."""
    import jtricks

    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    files = {"thesis.txt": b"precious", "sub/data.bin": bytes(range(7)), "config.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    args = ["train", *_npz(tmp_path), "--epochs", "1", "--no-progress", "--out", str(folder)]
    for extra in ([], ["--ensemble", "2"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "already exists and is not empty" in err
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        jtricks.train(model="mlp(features=(4,))", steps=1, out=str(folder))
    left = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert left == files


def test_a_refusal_after_the_run_folder_exists_leaves_nothing(tmp_path, capsys):
    """A shards mask of the wrong shape is refused as the stream's first batch is read,
    after the run folder was made: the folder goes again (and an empty folder given as
    --out stays, empty)."""
    from jtricks.cli import main
    from jtricks.data.shards import write_shards

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16, 1)).astype(np.float32)
    y = rng.integers(0, 3, (120, 16)).astype(np.int32)
    for split, n in (("train", 120), ("test", 40)):
        arrays = {"x": x[:n], "y": y[:n], "mask": np.ones((n, 8), np.float32)}
        write_shards(tmp_path / "d" / split, arrays, shard_size=60)
    args = ["train", "--dataset", f"shards:{tmp_path / 'd'}", "--task", "segmentation"]
    args += ["--model", "fcn1d", "--steps", "2", "--no-progress"]
    (tmp_path / "empty").mkdir()
    for out, stays in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "a mask must have the targets' shape (100, 16); got shape (100, 8)" in err
        assert out.exists() == stays and (not stays or not any(out.iterdir()))


def test_shards_refuse_nan_targets_in_the_words_npz_uses(tmp_path, capsys):
    """The values a full load refuses (here NaN regression targets past the first batch),
    a stream of shards refuses too, on the chunks as they are read, in the same words;
    nothing is left of the run."""
    from jtricks.cli import main
    from jtricks.data.shards import write_shards

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = rng.normal(size=(400, 1)).astype(np.float32)
    y[[120, 250, 350]] = np.nan
    write_shards(tmp_path / "s" / "train", {"x": x, "y": y}, shard_size=100)
    write_shards(tmp_path / "s" / "test", {"x": x[:40], "y": y[:40]}, shard_size=100)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:40], y_test=y[:40])
    words = "targets (batch[1]): 2 non-finite values (NaN or inf)"
    for spec in (f"shards:{tmp_path / 's'}", f"npz:{tmp_path / 'd.npz'}"):
        out = tmp_path / "run"
        args = ["train", "--dataset", spec, "--task", "regression", "--model", "mlp"]
        assert main([*args, "--epochs", "2", "--batch-size", "50", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "regression task, " in err and words in err and "Traceback" not in err
        assert not out.exists()


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A finished run with step records and TensorBoard files, checkpointed every epoch."""
    from jtricks.cli import main

    pytest.importorskip("tensorboardX")
    out = tmp_path_factory.mktemp("recorded") / "full"
    args = [
        "train",
        "--dataset",
        "synthetic(num_train=200, num_test=40, shape=(8,), num_classes=3)",
    ]
    args += ["--model", "mlp(features=(8,))", "--batch-size", "20", "--epochs", "4"]
    args += ["--checkpoint-every", "1", "--keep-checkpoints", "5", "--log-every-steps", "2"]
    assert main([*args, "--tensorboard", "--no-progress", "--out", str(out)]) == 0
    return out


def _cut_after_epoch_2(full, dest):
    import shutil

    shutil.copytree(full, dest)
    (dest / "summary.json").unlink()
    for name in ("epoch-000003", "epoch-000004"):
        shutil.rmtree(dest / "checkpoints" / name)
    return dest


@pytest.mark.parametrize("damage", ["cut", "deleted", "random bytes"])
def test_damaged_step_records_are_named_in_one_warning_and_the_run_goes_on(
    recorded_run, tmp_path, capsys, damage
):
    from jtricks.cli import main

    run = _cut_after_epoch_2(recorded_run, tmp_path / "run")
    steps = run / "steps.jsonl"
    if damage == "cut":
        steps.write_bytes(steps.read_bytes()[:300])  # one whole record and a cut one
    elif damage == "deleted":
        steps.unlink()
    else:
        steps.write_bytes(np.random.default_rng(0).bytes(500))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    lost = {"cut": 8, "deleted": 9, "random bytes": 9}[damage]
    assert f"steps.jsonl lacks {lost} of the 9 step records up to the checkpoint's step 18" in err
    assert "Traceback" not in err
    import json

    kept = [json.loads(line)["step"] for line in steps.read_text().splitlines()]
    assert kept[-9:] == list(range(20, 37, 2))  # the steps after the checkpoint, recorded


def test_an_unwritable_tensorboard_folder_is_one_line_before_training(
    recorded_run, tmp_path, capsys
):
    import shutil

    from jtricks.cli import main

    run = _cut_after_epoch_2(recorded_run, tmp_path / "run")
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("a file where the folder goes")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("tensorboard': File exists") and len(err.splitlines()) == 1
    assert (run / "checkpoints" / "epoch-000002").is_dir()  # nothing of the run lost
