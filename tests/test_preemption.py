"""Stopping a run on SIGTERM / Ctrl-C (`jtricks.training.preemption`): the program in
flight finishes, the state is saved as ``checkpoints/interrupted/``, the CLI exits with
one line and 128 + the signal, and ``--resume`` continues exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.data.stream import BatchStream, EpochBatches
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.training import Checkpointer, create_train_state, fit
from jtricks.training.checkpoint import list_checkpoints, restore_latest
from jtricks.training.preemption import StopSignals, exit_status
from jtricks.training.state import device_copy

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    return x, rng.integers(0, 3, 120).astype(np.int32)


def _state(x):
    model = build_model("mlp(features=(8,), dropout=0.1)", 3)
    return create_train_state(model, optax.adam(1e-2), x, jax.random.key(0))


def _same(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


class StopAfterParts:
    """A reporter that sets ``event`` once ``count`` parts of an epoch have finished."""

    def __init__(self, event, count):
        self.event, self.count, self.seen = event, count, 0

    def start(self, **kw):
        pass

    def part_end(self, **kw):
        self.seen += 1
        if self.seen == self.count:
            self.event.set()

    def epoch_end(self, record, *, done):
        pass

    def close(self):
        pass


def test_a_stop_between_parts_returns_the_state_reached_and_continuing_is_exact(data, tmp_path):
    x, y = data
    key = jax.random.key(4)
    kw = dict(batch_size=10, data_key=key, chunk=4, log_every_steps=1)  # 12 steps: parts of 4
    whole, hw = fit(_state(x), (x, y), epochs=3, **kw)
    stop = threading.Event()
    ckpt = Checkpointer(tmp_path / "ckpt", every=1)
    half, h1 = fit(_state(x), (x, y), epochs=3, stop=stop, callbacks=[ckpt],
                   reporter=StopAfterParts(stop, 4), **kw)  # fmt: skip
    # parts finish 4, 8 (epoch 1: 12), 16, 20: the 4th report sets the flag, the part in
    # flight (steps 21-24, the end of epoch 2) completes, and epoch 3 never starts
    assert h1.interrupted == {"step": 24, "epoch": 3, "signal": "a stop request"}
    assert [r["epoch"] for r in h1.records] == [1, 2] and int(half.step) == 24
    saved = list_checkpoints(tmp_path / "ckpt" / "interrupted")
    assert [p.name for p in saved] == ["epoch-000003"]
    restored, meta = restore_latest(tmp_path / "ckpt", _state(x))
    assert meta["interrupted"] is True and meta["step"] == 24 and len(meta["history"]) == 2
    _same(restored.params, half.params)
    rest, h2 = fit(restored, (x, y), epochs=1, **kw)
    _same(rest.params, whole.params)
    assert [r["step"] for r in h1.steps + h2.steps] == list(range(1, 37))
    assert h1.steps + h2.steps == hw.steps


def test_a_stop_mid_epoch_gives_no_record_for_the_partial_epoch(data):
    x, y = data
    stop = threading.Event()
    kw = dict(batch_size=10, data_key=jax.random.key(4), chunk=4)
    state, hist = fit(_state(x), (x, y), epochs=3, stop=stop,
                      reporter=StopAfterParts(stop, 1), **kw)  # fmt: skip
    # the first part's report comes once the second is dispatched: steps 1-8 run
    assert hist.interrupted["step"] == 8 and hist.records == [] and int(state.step) == 8
    assert hist.stopped == "interrupted by a stop request at step 8"
    whole, _ = fit(_state(x), (x, y), epochs=3, **kw)
    rest, _ = fit(state, (x, y), steps=28, **kw)
    _same(rest.params, whole.params)


def _means(records, first, last, name):
    """The mean of ``name`` over the step records of steps ``first`` to ``last``."""
    return np.mean([r[name] for r in records if first <= r["step"] <= last])


def test_a_resumed_epoch_averages_its_steps_before_and_after_the_stop(data):
    """The cut epoch's record after ``partial_epoch=``: its training means are those of
    the uninterrupted epoch, and equal the mean of the per-step records (a second code
    path, `StepLog`) over all its 12 steps; without it, the mean of steps 9-12 only."""
    x, y = data
    stop = threading.Event()
    kw = dict(batch_size=10, data_key=jax.random.key(4), chunk=4, log_every_steps=1)
    _, hw = fit(_state(x), (x, y), epochs=2, **kw)
    state, h1 = fit(_state(x), (x, y), epochs=2, stop=stop,
                    reporter=StopAfterParts(stop, 1), **kw)  # fmt: skip
    partial = h1.interrupted["partial_epoch"]
    assert {k: partial[k] for k in ("epoch", "step", "steps", "nonfinite")} == {
        "epoch": 1, "step": 8, "steps": 8, "nonfinite": 0,
    }  # fmt: skip
    np.testing.assert_allclose(partial["sums"]["loss"], 8 * _means(h1.steps, 1, 8, "loss"), 1e-5)
    _, h2 = fit(device_copy(state), (x, y), steps=16, partial_epoch=partial, **kw)
    steps = h1.steps + h2.steps
    for name in ("loss", "accuracy"):
        got, want = h2.records[0][f"train_{name}"], hw.records[0][f"train_{name}"]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got, _means(steps, 1, 12, name), rtol=1e-5)
    assert h2.records[1] == {**hw.records[1], **{k: h2.records[1][k] for k in TIMES}}
    _, alone = fit(state, (x, y), steps=4, **kw)  # no partial_epoch: steps 9-12 only
    np.testing.assert_allclose(
        alone.records[0]["train_loss"], _means(steps, 9, 12, "loss"), rtol=1e-5
    )


TIMES = ("steps_per_s", "elapsed_s")


def test_two_stops_in_one_epoch_add_up(data):
    """Stopped twice in the same epoch (steps 1-4, then 5-8), continued with each
    ``partial_epoch`` in turn: the record equals the uninterrupted epoch's."""
    x, y = data
    kw = dict(batch_size=10, data_key=jax.random.key(4), chunk=2)
    _, hw = fit(_state(x), (x, y), epochs=1, **kw)
    stop = threading.Event()
    state, h1 = fit(_state(x), (x, y), epochs=1, stop=stop,
                    reporter=StopAfterParts(stop, 1), **kw)  # fmt: skip
    stop.clear()
    first = h1.interrupted["partial_epoch"]
    state, h2 = fit(state, (x, y), steps=12 - first["step"], stop=stop, partial_epoch=first,
                    reporter=StopAfterParts(stop, 1), **kw)  # fmt: skip
    second = h2.interrupted["partial_epoch"]
    assert second["steps"] == second["step"] > first["steps"] == first["step"]
    _, h3 = fit(state, (x, y), steps=12 - second["step"], partial_epoch=second, **kw)
    for name in ("train_loss", "train_accuracy"):
        np.testing.assert_allclose(h3.records[0][name], hw.records[0][name], rtol=1e-6)


def test_a_partial_epoch_of_another_state_is_refused(data):
    x, y = data
    state, _ = fit(_state(x), (x, y), steps=5, batch_size=10)
    partial = {"epoch": 1, "step": 4, "steps": 4, "sums": {"loss": 4.0}, "nonfinite": 0}
    with pytest.raises(ConfigError, match=r"partial_epoch is of step 4 \(epoch 1\), but the "
                       r"state is at step 5 \(epoch 1 of 12 steps\)"):  # fmt: skip
        fit(state, (x, y), steps=1, batch_size=10, partial_epoch=partial)
    with pytest.raises(ConfigError, match=r"partial_epoch must be a history\.interrupted"):
        fit(state, (x, y), steps=1, batch_size=10, partial_epoch={"step": 5})


def test_a_stream_stops_between_chunks_with_its_data_state(data):
    x, y = data
    key = jax.random.key(2)
    whole, hw = fit(_state(x), BatchStream(EpochBatches((x, y), 10, key)), steps=20, chunk=3)
    stop = threading.Event()
    half, h = fit(_state(x), BatchStream(EpochBatches((x, y), 10, key)), steps=20, chunk=3,
                  stop=stop, reporter=StopAfterParts(stop, 2))  # fmt: skip
    info = h.interrupted
    assert info["step"] == 9 and info["data_state"] == {"next_index": 9}
    rest, h2 = fit(half, BatchStream(EpochBatches((x, y), 10, key)), steps=11, chunk=3,
                   data_state=info["data_state"], partial_epoch=info["partial_epoch"])  # fmt: skip
    _same(rest.params, whole.params)
    np.testing.assert_allclose(h2.records[0]["train_loss"], hw.records[0]["train_loss"], 1e-6)


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM at Python's defaults, whatever this process inherited (a shell
    starts background jobs with SIGINT ignored), and put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_signals_turn_the_first_signal_into_a_flag_and_the_second_into_the_default(
    default_signals,
):
    with StopSignals() as stop:
        assert not stop.is_set()
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set() and stop.name == "SIGINT" and exit_status(stop) == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with StopSignals() as term:
        signal.raise_signal(signal.SIGTERM)
        assert term.name == "SIGTERM" and exit_status(term) == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_inherited_as_ignored_stays_ignored(default_signals):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job starts
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # the terminal's Ctrl-C: not for this job
        assert not stop.is_set()
        signal.raise_signal(signal.SIGTERM)  # still stops it
        assert stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


ARGS = ["--dataset", "synthetic(num_train=300, num_test=50, shape=(8,), num_classes=3)"]
ARGS += ["--model", "mlp(features=(16,), dropout=0.2)", "--optimizer", "momentum", "--lr", "0.05"]
ARGS += ["--schedule", "cosine", "--batch-size", "15", "--epochs", "6", "--chunk", "5"]
ARGS += ["--checkpoint-every", "2", "--log-every-steps", "3", "--no-progress"]


def _driven(mode: str, parts: int, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "fault_driver.py"), mode, str(parts), "--", *ARGS,
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _params(run: Path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(list_checkpoints(run / "checkpoints")[-1].absolute() / "state")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("mode", "status", "name"), [("term", 143, "SIGTERM"), ("int", 130, "SIGINT")]
)
def test_cli_signal_saves_exits_with_one_line_and_resume_is_bit_identical(
    tmp_path, reference, mode, status, name
):
    out = tmp_path / "run"
    proc = _driven(mode, 9, out)  # 18 steps an epoch in parts of 5, 5, 4, 4: mid-epoch 3
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"jtricks train: interrupted by {name} at step ")
    assert f"jtricks train --resume {out}" in lines[0]
    assert [p.name for p in list_checkpoints(out / "checkpoints" / "interrupted")] == [
        "epoch-000003"
    ]
    assert not (out / "summary.json").exists()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _same(_params(out), _params(reference))
    ref = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in got] == [r["val_loss"] for r in ref]  # epoch 3's too
    for name in ("train_loss", "train_accuracy", "lr"):  # epoch 3's cover all its steps
        np.testing.assert_allclose([r[name] for r in got], [r[name] for r in ref], rtol=1e-5)
    assert (out / "steps.jsonl").read_text() == (reference / "steps.jsonl").read_text()
    assert list_checkpoints(out / "checkpoints" / "interrupted") == []  # superseded


def test_an_ensemble_checkpoints_stops_and_resumes_exactly_with_its_ema(tmp_path):
    """An ensemble is a run like any other: checkpoints (its stacked state), a stop mid-epoch
    saved as ``interrupted`` and continued to the uninterrupted run's members to the bit,
    ``load_run`` of it, and ``--ema`` kept per member (it once took a path of its own that
    had none of these and dropped the EMA without a word)."""
    import jtricks
    from jtricks.errors import Interrupted

    config = dict(
        dataset="synthetic(num_train=300, num_test=50, shape=(8,), num_classes=3)",
        model="mlp(features=(16,), dropout=0.2)", optimizer="momentum", learning_rate=0.05,
        schedule="cosine", batch_size=15, epochs=3, chunk=5, checkpoint_every=2,
        log_every_steps=3, ensemble=2, ema=0.9,
    )  # the CLI test's run (ARGS), 3 epochs of 2 members  # fmt: skip
    reference = jtricks.train(**config, out=tmp_path / "ref")
    stop = threading.Event()
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # 3 parts an epoch: stopped after epoch 3's first
        jtricks.train(**config, out=out, stop=stop, reporter=StopAfterParts(stop, 7))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["epoch-000002"]
    assert [p.name for p in list_checkpoints(out / "checkpoints" / "interrupted")] == [
        "epoch-000003"
    ]
    resumed = jtricks.train(resume=out)
    parts = lambda s: (s.params, s.ema_params, s.opt_state, s.step)  # noqa: E731
    _same(parts(resumed.state), parts(reference.state))
    assert resumed.test == reference.test and "ema_member_accuracy" in reference.test
    assert np.ndim(reference.state.ema_params["Dense_0"]["kernel"]) == 3  # per member
    _same(jtricks.load_run(out).state.params, reference.state.params)


def test_swa_resumes_exactly_from_an_interrupted_or_an_epoch_checkpoint(tmp_path):
    """SWA's running average is saved beside the state (``arrays/``) with its count, so a
    stopped SWA run (here an ensemble: each member's average) continues to the bit from
    its interrupted checkpoint and from the epoch checkpoint before it (it was refused)."""
    import shutil

    import jtricks
    from jtricks.errors import Interrupted

    config = dict(
        dataset="synthetic(num_train=300, num_test=50, shape=(8,), num_classes=3)",
        model="mlp(features=(16,), dropout=0.2)", optimizer="momentum", learning_rate=0.05,
        batch_size=15, epochs=4, chunk=10, checkpoint_every=2, ensemble=2, swa=2,
    )  # parts of 9 steps, 2 an epoch; epochs 2, 3 and 4 averaged  # fmt: skip
    reference = jtricks.train(**config, out=tmp_path / "ref")
    stop, out, again = threading.Event(), tmp_path / "run", tmp_path / "again"
    with pytest.raises(Interrupted):  # after epoch 3's first part: epoch 2 averaged
        jtricks.train(**config, out=out, stop=stop, reporter=StopAfterParts(stop, 3))
    (cut,) = list_checkpoints(out / "checkpoints" / "interrupted")
    assert (cut / "arrays").is_dir() and (out / "checkpoints/epoch-000002/arrays").is_dir()
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "interrupted")  # resumes from epoch 2's
    for run in (out, again):
        resumed = jtricks.train(resume=run)
        _same((resumed.state.params, resumed.state.opt_state), (reference.state.params,
              reference.state.opt_state))  # fmt: skip
        assert resumed.test == reference.test
    swa = jtricks.training.averaging.SWA(1)
    with pytest.raises(ConfigError, match="holds no SWA average"):
        swa.load_state_dict({"count": 2}, {})
