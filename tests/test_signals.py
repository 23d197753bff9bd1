"""SIGINT and SIGTERM at any moment of ``jtricks train``: before training one line, the
shell's status and nothing left behind; an ignored signal stays ignored; what a cut
checkpoint write leaves is removed by the next ``--resume``, which says so."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jtricks.cli import main
from jtricks.rundir import create_run_dir, undo_new_runs

TINY = [
    "--dataset",
    "synthetic(num_train=120, num_test=60, shape=(8,), num_classes=3)",
    "--model",
    "mlp(features=(8,))",
]


def _start(args: list[str], *, ignore_sigint: bool = False) -> subprocess.Popen:
    """``jtricks ARGS`` with SIGINT at the default (as a terminal starts it) or ignored,
    whatever this process inherited; set in the child's first line (no ``preexec_fn``:
    forking a process that runs JAX's threads is unsafe)."""
    disposition = "SIG_IGN" if ignore_sigint else "SIG_DFL"
    code = (
        f"import signal, sys; signal.signal(signal.SIGINT, signal.{disposition}); "
        "from jtricks.cli import main; sys.exit(main())"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("signum", "delay"),
    [
        (signal.SIGINT, 0.5),
        (signal.SIGINT, 1.0),
        (signal.SIGINT, 1.5),
        (signal.SIGINT, 2.0),
        (signal.SIGTERM, 1.0),
    ],
)
def test_a_signal_early_ends_the_run_in_one_line(tmp_path, signum, delay):
    out = tmp_path / "run"
    proc = _start(["train", "--out", str(out)])  # the default CNN: seconds before training
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + signum
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jtricks"), err
    assert signal.Signals(signum).name in lines[0]
    if out.exists():  # the signal came once training had begun: the state reached is saved
        assert (out / "checkpoints" / "interrupted").is_dir()


def test_an_ignored_sigint_stays_ignored(tmp_path):
    args = ["train", *TINY, "--steps", "200000", "--out", str(tmp_path / "run")]
    proc = _start(args, ignore_sigint=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # a background job's Ctrl-C is not for it
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM


def test_undo_new_runs_takes_back_an_untrained_folder_only(tmp_path):
    with contextlib.ExitStack() as stack:
        fresh = create_run_dir(tmp_path / "fresh", stack)
        (fresh / "config.json").write_text("{}")
        trained = create_run_dir(tmp_path / "trained", stack)
        (trained / "checkpoints" / "epoch-000001").mkdir(parents=True)
        assert undo_new_runs() == [trained]
        assert not fresh.exists() and trained.is_dir()
    assert undo_new_runs() == []  # the runs ended: nothing is registered


def test_resume_removes_what_a_cut_checkpoint_write_left(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--batch-size", "20", "--out", str(out)]) == 0
    cut = [out / "checkpoints" / ".tmp-epoch-000003", out / "checkpoints" / "interrupted"]
    cut.append(cut[1] / ".tmp-epoch-000003")
    for folder in (cut[0], cut[2]):
        folder.mkdir(parents=True)
        (folder / "half").write_bytes(b"\0" * 10)
    (out / "summary.json").unlink()  # as if the run had been stopped before its end
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "removed 2 unfinished checkpoint write(s)" in err
    assert not cut[0].exists() and not cut[2].exists()
    assert not list(Path(out).rglob(".tmp-*"))


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_nobody_joins_gives_up_in_one_line(tmp_path, process_id):
    """Process 1 with no coordinator running, and process 0 alone: one line naming the
    coordinator and what to check, exit 2, within the bound (JAX itself would abort with
    a stack trace, after 5 minutes by default)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", "--out", str(out), "--distributed-timeout", "2"]
    args += ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    started = time.monotonic()
    proc = _start([*args, "--process-id", str(process_id)])
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 2 + 15  # the bound, plus starting Python and JAX
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"process {process_id} of 2 did not join the run within 2 s" in lines[0]
    assert f"--coordinator localhost:{port}" in lines[0] and not out.exists()


def test_processes_started_with_different_counts_are_refused_in_one_line(tmp_path):
    """Process 1 started with ``--num-processes 3`` beside a process 0 started for 2:
    both end with one line naming the counts, exit 2, and no run folder."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", "--out", str(out), "--distributed-timeout", "20"]
    args += ["--coordinator", f"localhost:{port}"]
    procs = [
        _start([*args, "--num-processes", str(n), "--process-id", str(i)])
        for i, n in ((0, 2), (1, 3))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "different --num-processes (process 0: 2, process 1: 3" in lines[0]
    assert not out.exists()


def test_two_processes_with_one_id_are_named_in_one_line(tmp_path, monkeypatch):
    """Processes 0, 1 and 1 again: JAX's coordination service aborts them from C++; each
    prints one line (the command's filter, `jtricks.cli.fatal`) instead of a stack
    trace, process 0's naming the repeated id; nothing is left behind. Without the
    tests' shared XLA cache: loading the programs other tests compiled, process 0 got
    far enough to make its run folder before the abort reached it (a C++ abort, so
    nothing removes it), in 2 of 5 CI runs once the cache kept every program."""
    import socket

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["train", *TINY, "--epochs", "1", "--distributed-timeout", "5"]
    args += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    procs = []
    for i, pid in enumerate((0, 1, 1)):
        procs.append(_start([*args, str(pid), "--out", str(tmp_path / f"run{i}")]))
        time.sleep(0.3)
    errs = [proc.communicate(timeout=60)[1] for proc in procs]
    assert all(len(err.strip().splitlines()) == 1 for err in errs), errs
    assert "two processes were started with --process-id 1" in errs[0]
    assert procs[0].returncode != 0 and not list(tmp_path.iterdir())


def test_a_bad_timeout_is_refused(capsys):
    args = ["train", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "1"]
    assert main([*args, "--distributed-timeout", "0"]) == 2
    assert "--distributed-timeout" in capsys.readouterr().err
