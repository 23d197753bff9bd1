"""Seeing inside a run: per-step records (``fit(log_every_steps=N)``), epochs in parts
with progress between them (``chunk``), profiles (`Profile`) and their CLI flags."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.data import epoch_indices
from jtricks.data.stream import BatchStream, EpochBatches
from jtricks.training import create_train_state, fit
from jtricks.training.profile import Profile
from jtricks.training.runs import part_length

HERE = Path(__file__).parent
N, FEATURES, CLASSES, BATCH = 40, 5, 3, 10
SCHEDULE = optax.linear_schedule(0.5, 0.05, 8)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(CLASSES)(x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    return x, rng.integers(0, CLASSES, N).astype(np.int32)


def _state(x):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE)
    return create_train_state(Linear(), tx, x, jax.random.key(0))


def _hand_loop(state, x, y, steps: int, data_key) -> list[dict]:
    """Softmax regression trained by SGD written out in float64 NumPy, on fit's batches:
    per step the loss, the schedule's rate, the gradient, update and parameter norms."""
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    per_epoch = N // BATCH
    rows = []
    for t in range(steps):
        epoch, j = divmod(t, per_epoch)
        idx = np.asarray(epoch_indices(jax.random.fold_in(data_key, epoch), N, BATCH, per_epoch))
        xb, yb = x[idx[j]].astype(np.float64), y[idx[j]]
        z = xb @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(BATCH), yb]))
        d = (p - np.eye(CLASSES)[yb]) / BATCH
        gw, gb = xb.T @ d, d.sum(0)
        lr = 0.5 + (0.05 - 0.5) * min(t, 8) / 8  # linear_schedule(0.5, 0.05, 8) at count t
        grad_norm = np.sqrt((gw**2).sum() + (gb**2).sum())
        w, b = w - lr * gw, b - lr * gb
        rows.append(
            dict(step=t + 1, loss=loss, lr=lr, grad_norm=grad_norm, update_norm=lr * grad_norm,
                 param_norm=np.sqrt((w**2).sum() + (b**2).sum()))
        )  # fmt: skip
    return rows


@pytest.mark.parametrize("every", [1, 3])
def test_step_records_equal_a_hand_written_loop(data, every):
    x, y = data
    key = jax.random.key(7)
    state = _state(x)
    expected = [r for r in _hand_loop(state, x, y, 8, key) if r["step"] % every == 0]
    _, hist = fit(state, (x, y), batch_size=BATCH, steps=8, data_key=key, log_every_steps=every)
    assert [r["step"] for r in hist.steps] == [r["step"] for r in expected]
    for got, want in zip(hist.steps, expected, strict=True):
        assert got["skipped"] == 0 and 0 <= got["accuracy"] <= 1
        for name in ("loss", "lr", "grad_norm", "update_norm", "param_norm"):
            assert got[name] == pytest.approx(want[name], rel=2e-5), (got["step"], name)
    steps, _ = hist.step_column("lr")
    np.testing.assert_array_equal(steps, [r["step"] for r in expected])
    # the epoch records are those of a run without step records (the norms stay private)
    _, plain = fit(_state(x), (x, y), batch_size=BATCH, steps=8, data_key=key)
    assert hist.records[-1].keys() - {"steps_per_s", "elapsed_s"} == plain.records[-1].keys() - {
        "steps_per_s",
        "elapsed_s",
    }
    assert hist.records[-1]["train_loss"] == plain.records[-1]["train_loss"]


class Parts:
    """A reporter recording what `fit` shows during and after each epoch."""

    def __init__(self):
        self.calls = []

    def start(self, *, total_steps, done=0):
        self.calls.append(("start", total_steps))

    def part_end(self, *, epoch, step, loss, done):
        self.calls.append(("part", epoch, done, loss, step))

    def epoch_end(self, record, *, done):
        self.calls.append(("epoch", record["epoch"], done))

    def close(self):
        pass


def test_parts_of_an_epoch_change_nothing_and_report_progress_between_them(data):
    x, y = data
    x4, y4 = np.tile(x, (4, 1)), np.tile(y, 4)  # 16 steps an epoch
    key = jax.random.key(3)
    whole, hw = fit(_state(x), (x4, y4), batch_size=BATCH, epochs=2, data_key=key,
                    val_data=(x, y), log_every_steps=2)  # fmt: skip
    reporter = Parts()
    parts, hp = fit(_state(x), (x4, y4), batch_size=BATCH, epochs=2, data_key=key,
                    val_data=(x, y), log_every_steps=2, chunk=6, reporter=reporter)  # fmt: skip
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(parts.params), strict=True):
        np.testing.assert_array_equal(a, b)
    strip = {"steps_per_s", "elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in hw.records] == [
        {k: v for k, v in r.items() if k not in strip} for r in hp.records
    ]
    assert hw.steps == hp.steps and [r["step"] for r in hp.steps] == list(range(2, 33, 2))
    # 16 steps in parts of at most 6, as equal as possible: 6, 5, 5 (part_length)
    assert part_length(16, 6) == 6 and part_length(36, 10) == 9 and part_length(5, None) == 5
    shown = [c[:3] for c in reporter.calls]
    assert shown == [("start", 32), ("part", 1, 6), ("part", 1, 12), ("epoch", 1, 16),
                     ("part", 2, 22), ("part", 2, 28), ("epoch", 2, 32)]  # fmt: skip
    # the running loss shown after the first part is the mean of its 6 steps' losses
    _, every = fit(_state(x), (x4, y4), batch_size=BATCH, steps=6, data_key=key, log_every_steps=1)
    assert reporter.calls[1][3] == pytest.approx(np.mean([r["loss"] for r in every.steps]))
    assert [c[4] for c in reporter.calls if c[0] == "part"] == [6, 12, 22, 28]  # global steps


def test_a_log_shows_in_progress_lines_between_parts(data, tmp_path):
    from jtricks.training.progress import RichReporter

    x, y = data
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        fit(_state(x), (np.tile(x, (2, 1)), np.tile(y, 2)), batch_size=BATCH, epochs=1,
            chunk=3, reporter=RichReporter(file=f, in_progress_s=0.0))  # fmt: skip
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    # 8 steps in parts of 3, 3, 2: a line after each of the first two, then the epoch's
    assert [line.split()[:4] for line in lines] == [
        ["epoch", "1", "step", "3"],
        ["epoch", "1", "step", "6"],
        ["epoch", "1", "step", "8"],
    ]
    assert lines[0].endswith("(in progress)") and "val" not in lines[1]
    assert not lines[2].endswith("(in progress)")


def test_a_continued_run_continues_the_step_records(data):
    x, y = data
    key = jax.random.key(5)
    _, one = fit(_state(x), (x, y), batch_size=BATCH, steps=11, data_key=key, log_every_steps=2)
    half, h1 = fit(_state(x), (x, y), batch_size=BATCH, steps=5, data_key=key, log_every_steps=2)
    _, h2 = fit(half, (x, y), batch_size=BATCH, steps=6, data_key=key, log_every_steps=2)
    assert [r["step"] for r in h1.steps + h2.steps] == [2, 4, 6, 8, 10]
    assert h1.steps + h2.steps == one.steps


def test_a_stream_records_the_same_steps(data):
    x, y = data
    key = jax.random.key(1)
    _, arrays = fit(_state(x), (x, y), batch_size=BATCH, steps=8, data_key=key, log_every_steps=3)
    stream = BatchStream(EpochBatches((x, y), BATCH, key))
    reporter = Parts()
    _, streamed = fit(_state(x), stream, steps=8, chunk=3, log_every_steps=3, reporter=reporter)
    assert streamed.steps == arrays.steps and [r["step"] for r in arrays.steps] == [3, 6]
    # epochs of len(stream) = 4 steps, each in chunks of 3 and 1: progress after each 3
    assert [c[2] for c in reporter.calls if c[0] == "part"] == [3, 7]


def _train_events(logdir: Path) -> list[tuple[str, int]]:
    (trace,) = logdir.glob("plugins/profile/*/*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return sorted(
        {(e["name"], int(e["args"]["step_num"])) for e in events if e.get("name") == "train"}
    )


def test_a_profile_traces_exactly_its_steps_and_changes_nothing(data, tmp_path):
    x, y = data
    key = jax.random.key(2)
    plain, _ = fit(_state(x), (x, y), batch_size=BATCH, steps=8, data_key=key)
    profile = Profile(tmp_path / "profile", 3, 5)
    traced, _ = fit(_state(x), (x, y), batch_size=BATCH, steps=8, data_key=key, profile=profile)
    assert _train_events(tmp_path / "profile") == [("train", 3), ("train", 4), ("train", 5)]
    assert {p.suffix for p in profile.trace_files()} == {".pb", ".gz"}
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(traced.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # programs of other lengths
    # the steps 3-5 one per dispatch, and step 2 too: it compiles the one-step program
    assert Profile(tmp_path / "q", 3, 5).pieces(0, 8, 4) == [1, 1, 1, 1, 1, 3]
    assert profile.pieces(0, 8, 4) == [4, 4]  # once traced, never again


def test_a_profile_of_a_stream_traces_the_chunks_that_hold_its_steps(data, tmp_path):
    x, y = data
    stream = BatchStream(EpochBatches((x, y), BATCH, jax.random.key(1)))
    profile = Profile(tmp_path / "p", 5, 6)
    fit(_state(x), stream, steps=8, chunk=4, profile=profile)
    assert _train_events(tmp_path / "p") == [("train", 5)]  # the chunk of steps 5-8


def test_bad_settings_are_one_line(data, tmp_path, capsys):
    x, y = data
    with pytest.raises(Exception, match="log_every_steps"):
        fit(_state(x), (x, y), batch_size=BATCH, steps=2, log_every_steps=0)
    with pytest.raises(Exception, match="profile"):
        Profile(tmp_path, 5, 3)
    for bad in ("3:1", "0:2", "a:b", "2:"):
        assert main(["train", *TINY, "--profile", bad, "--out", str(tmp_path / "x")]) == 2
        assert "profile must be steps A:B" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


TINY = ["--dataset", "synthetic(num_train=300, num_test=50, shape=(8,), num_classes=3, noise=2.0)"]
TINY += ["--model", "mlp(features=(16,), dropout=0.2)", "--optimizer", "momentum", "--lr", "0.05"]
TINY += ["--schedule", "cosine", "--batch-size", "25", "--epochs", "12", "--no-progress"]
TINY += ["--checkpoint-every", "2", "--log-every-steps", "5"]


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def test_cli_steps_jsonl_continues_without_gap_or_duplicate_after_a_kill(tmp_path):
    reference = tmp_path / "ref"
    assert main(["train", *TINY, "--out", str(reference)]) == 0
    rows = _steps(reference)
    total = json.loads((reference / "summary.json").read_text())["steps"]
    assert [r["step"] for r in rows] == list(range(5, total + 1, 5))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(HERE / "fault_driver.py"), "save", "6", "--", *TINY, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    written = _steps(out)  # epochs 5 and 6 ran past the newest checkpoint (epoch 4)
    assert written[-1]["step"] > 4 * total // 12
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert _steps(out) == rows
