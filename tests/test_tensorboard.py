"""TensorBoard event files of a run's records (`jtricks.training.tensorboard`), read back
with TensorBoard's own reader: the same scalars as the records, at the records' steps."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.nn import build_model
from jtricks.training import create_train_state, fit
from jtricks.training.tensorboard import TensorBoard, scalars

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def test_every_numeric_entry_of_every_record_is_a_scalar_at_its_step(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)).astype(np.float32), rng.integers(0, 3, 60)
    state = create_train_state(
        build_model("mlp(features=(8,))", 3), optax.adam(1e-2), x, jax.random.key(0)
    )
    board = TensorBoard(tmp_path / "tb", config={"model": "mlp", "lr": 1e-2})
    _, hist = fit(state, (x, y), val_data=(x, y), batch_size=10, epochs=3, callbacks=[board])
    board.close()
    acc = _read(tmp_path / "tb")
    for record in hist.records:
        for name, value in scalars(record).items():
            got = {e.step: e.value for e in acc.Scalars(name)}
            assert got[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), name
    assert "val_loss" in acc.Tags()["scalars"] and "config/text_summary" in acc.Tags()["tensors"]
    epochs = {e.step: e.value for e in acc.Scalars("epoch")}  # the epoch axis, at each step
    assert epochs == {r["step"]: r["epoch"] for r in hist.records} == {6: 1, 12: 2, 18: 3}


def test_member_lists_become_one_scalar_per_member():
    record = {"epoch": 1, "step": 5, "val_loss": 0.5, "val_member_loss": [0.4, 0.6], "ok": True}
    assert scalars(record) == {
        "val_loss": 0.5,
        "val_member_loss/member_0": 0.4,
        "val_member_loss/member_1": 0.6,
    }


TINY = ["--dataset", "synthetic(num_train=120, num_test=30, shape=(8,), num_classes=3)"]
TINY += ["--model", "mlp(features=(8,))", "--epochs", "2", "--no-progress"]


def test_the_cli_writes_the_runs_records_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tensorboard", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = _read(out / "tensorboard")
    got = [(e.step, e.value) for e in acc.Scalars("val_loss")]
    assert got == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in records]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"batch_size": 100' in text and '"tensorboard": true' in text
    capsys.readouterr()


def test_an_ensembles_members_are_scalars_of_their_own(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--ensemble", "2", "--tensorboard", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    member = next(k for k in records[-1] if k.startswith("val_member_"))
    acc = _read(out / "tensorboard")
    for i, value in enumerate(records[-1][member]):
        got = acc.Scalars(f"{member}/member_{i}")[-1]
        assert (got.step, got.value) == (records[-1]["step"], pytest.approx(value, rel=1e-6))
    capsys.readouterr()


def test_without_tensorboardx_it_is_one_line_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if absent
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "argument --tensorboard: tensorboard needs tensorboardX" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_step_records_become_step_scalars_at_their_steps(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 5)).astype(np.float32), rng.integers(0, 3, 60)
    state = create_train_state(
        build_model("mlp(features=(8,))", 3), optax.adam(1e-2), x, jax.random.key(0)
    )
    with TensorBoard(tmp_path / "tb") as board:
        _, hist = fit(state, (x, y), batch_size=10, epochs=2, callbacks=[board], log_every_steps=4)
    acc = _read(tmp_path / "tb")
    assert [r["step"] for r in hist.steps] == [4, 8, 12]
    for name in ("loss", "grad_norm", "update_norm", "param_norm", "skipped"):
        got = {e.step: e.value for e in acc.Scalars(f"step/{name}")}
        assert got == pytest.approx({r["step"]: r[name] for r in hist.steps}, rel=1e-6), name


def test_a_resumed_run_hides_the_events_it_logs_again(tmp_path):
    """A run killed after its last checkpoint logged epochs it runs again on ``--resume``;
    the new event file starts at the restored step (tensorboardX's ``purge_step``), so
    TensorBoard draws each step once, with the resumed run's values, and the config once."""
    import shutil

    import jtricks

    out = tmp_path / "run"
    settings = dict(model="mlp(features=(8,))", epochs=4, checkpoint_every=2, batch_size=12)
    settings.update(tensorboard=True, log_every_steps=4, progress=False)
    jtricks.train(dataset=TINY[1], **settings, out=out)
    (out / "summary.json").unlink()  # as if killed in epoch 4, with epoch 2 saved last
    shutil.rmtree(out / "checkpoints" / "epoch-000004")
    jtricks.train(resume=out, progress=False)
    acc = _read(out / "tensorboard")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [(e.step, e.value) for e in acc.Scalars("val_loss")]
    assert got == [(r["step"], pytest.approx(r["val_loss"])) for r in records]
    assert len(got) == 4 and len({e.step for e in acc.Scalars("step/loss")}) == len(
        acc.Scalars("step/loss")
    )
    assert len(acc.Tensors("config/text_summary")) == 1
