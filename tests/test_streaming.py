"""Streaming: fit on iterables of host batches, shards on disk, Grain, exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.data.augment import build_augment
from jtricks.data.shards import ShardedArrays, load_shards, write_shards
from jtricks.data.stream import (
    BatchStream,
    EpochBatches,
    SequentialBatches,
    data_state,
    is_stream,
    restore_iterator,
)
from jtricks.errors import ConfigError, StreamError
from jtricks.nn import MLP
from jtricks.optim import fused
from jtricks.training import create_train_state, evaluate, fit
from jtricks.training.checkpoint import list_checkpoints, read_meta
from jtricks.training.compiled import StepOptions, part_program
from jtricks.training.streaming import chunk_plan, default_chunk

HERE = Path(__file__).parent
MODEL = MLP(num_classes=4, features=(16,), dropout=0.2)
ADAM = optax.adam(1e-2)  # one object: fit calls reuse the compiled programs


@pytest.fixture(scope="module")
def data(tiny_data):
    return (tiny_data.x_train, tiny_data.y_train), (tiny_data.x_test, tiny_data.y_test)


def _state(tx=None):
    x = np.zeros((1, 16), np.float32)
    return create_train_state(MODEL, tx or ADAM, x, jax.random.key(0), ema_decay=0.9)


def _same(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _stream(train, batch_size, **kw):
    key = jax.random.fold_in(_state().key, 1)  # fit's default data key
    return BatchStream(EpochBatches(train, batch_size, key), **kw)


@pytest.mark.parametrize(
    ("options", "batch"),
    [
        ({}, 30),
        ({"accumulate": 2, "augment": "shift(2)"}, 20),
        ({"fused": True}, 30),
    ],
    ids=["plain", "accumulate-augment", "fused"],
)
def test_stream_of_the_same_batches_is_bit_identical(data, options, batch):
    """200 examples, batch 30: 6 steps an epoch, run in chunks of 4 (4 + 2 a epoch)."""
    train, test = data
    kw = {k: v for k, v in options.items() if k != "fused"}
    if "augment" in kw:
        kw["augment"] = build_augment(kw["augment"])
    tx = fused(ADAM) if options.get("fused") else None
    if "augment" in kw:  # the shift needs a length axis: examples (16,) -> (16, 1)
        train = (train[0][..., None], train[1])
        test = (test[0][..., None], test[1])
    x0 = np.zeros((1, *train[0].shape[1:]), np.float32)
    state = create_train_state(MODEL, tx or ADAM, x0, jax.random.key(0), ema_decay=0.9)
    acc = kw.get("accumulate", 1)
    a, ha = fit(state, train, batch_size=batch, epochs=3, val_data=test, **kw)
    state = create_train_state(MODEL, tx or ADAM, x0, jax.random.key(0), ema_decay=0.9)
    stream = _stream(train, batch * acc)
    b, hb = fit(state, stream, epochs=3, val_data=test, chunk=4, **kw)
    _same(a.params, b.params)
    _same(a.ema_params, b.ema_params)
    assert [r["val_loss"] for r in ha] == [r["val_loss"] for r in hb]
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    assert hb.records[-1]["data_state"] == {"next_index": 3 * (200 // (batch * acc))}


def test_continuing_from_a_records_data_state_equals_one_run(data):
    train, _ = data
    whole, _ = fit(_state(), _stream(train, 30), steps=10, chunk=4)
    run_chunk = part_program(StepOptions())  # fit's options by default
    compiled = run_chunk._cache_size()
    assert compiled >= 1  # the program fit used
    half, h = fit(_state(), _stream(train, 30), steps=4, chunk=4)
    rest, h2 = fit(half, _stream(train, 30), steps=6, chunk=4, data_state=h[-1]["data_state"])
    _same(whole.params, rest.params)
    assert h2.records[-1]["step"] == 10 and h2.records[-1]["data_state"] == {"next_index": 10}
    assert run_chunk._cache_size() == compiled  # later calls reuse the compiled chunk


def test_grain_reads_the_same_batches_with_the_same_state(data):
    pytest.importorskip("grain")
    train, _ = data
    py, gr = iter(_stream(train, 30)), iter(_stream(train, 30, loader="grain", threads=2))
    for _ in range(8):  # across an epoch boundary (6 batches an epoch)
        _same(next(py), next(gr))
    assert data_state(py) == data_state(gr) == {"next_index": 8}
    again = iter(_stream(train, 30, loader="grain"))
    restore_iterator(again, data_state(gr))
    _same(next(again), next(py))


def test_a_one_pass_grain_dataset_resumes_at_an_epoch_boundary(data):
    """A Grain ``MapDataset`` of one pass (each ``iter()`` one epoch): its state at the end
    of epoch 1 restores to a finished pass, and the resumed run starts the next pass,
    as the run of 2 epochs in one call does (bit-identical parameters)."""
    grain = pytest.importorskip("grain")
    (x, y), _ = data
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 200, 40)]
    ds = grain.MapDataset.source(batches)
    whole, _ = fit(_state(), ds, epochs=2)
    half, h = fit(_state(), ds, epochs=1)
    assert h[-1]["data_state"] == {"next_index": 5}
    rest, h2 = fit(half, ds, epochs=1, data_state=h[-1]["data_state"])
    assert h2.records[-1]["step"] == 10
    _same(whole.params, rest.params)


def test_any_iterable_trains(data):
    """A generator (no len: steps is one epoch), a re-iterable with len (passes repeat) and
    a one-shot stream that runs out (training stops and says so)."""
    train, _ = data
    batches = [(train[0][i : i + 40], train[1][i : i + 40]) for i in range(0, 200, 40)]
    gen = (b for b in batches * 2)
    assert is_stream(gen) and not is_stream(train) and is_stream(batches)  # a list of batches
    _, h = fit(_state(), gen, steps=7, chunk=3)
    assert [r["step"] for r in h] == [7] and "data_state" not in h[-1]

    class Passes:
        def __len__(self):
            return len(batches)

        def __iter__(self):
            return iter(batches)

    _, h = fit(_state(), Passes(), epochs=3, chunk=2)
    assert [r["step"] for r in h] == [5, 10, 15] and h.stopped is None
    _, h = fit(_state(), iter(batches), epochs=3, steps_per_epoch=3)
    assert [r["step"] for r in h] == [3, 5] and "ran out at step 5" in h.stopped
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        fit(_state(), iter(batches), epochs=1)
    with pytest.raises(ConfigError, match="batch_size=30 but"):
        fit(_state(), iter(batches), steps=2, batch_size=30)
    with pytest.raises(ConfigError, match="has no set_state"):
        fit(_state(), iter(batches), steps=2, data_state={"next_index": 1})


def test_a_failing_stream_raises_with_the_state_reached(data):
    train, _ = data

    def flaky():
        for i in range(100):
            if i == 9:
                raise OSError(5, "Input/output error")
            yield train[0][:20], train[1][:20]

    with pytest.raises(StreamError, match=r"after 9 batch.*OSError.*Input/output") as err:
        fit(_state(), flaky(), steps=20, steps_per_epoch=5, chunk=2)
    assert int(err.value.state.step) == 9  # every batch read before the failure was trained

    def ragged(last=True):
        yield train[0][:20], train[1][:20]
        yield train[0][:10], train[1][:10]
        if not last:
            yield train[0][:20], train[1][:20]

    with pytest.raises(StreamError, match=r"batch 2 of its pass holds 10 examples, the first 20"):
        fit(_state(), ragged(last=False), steps=3, chunk=3)
    state, history = fit(_state(), ragged(), steps=2, chunk=2)  # a shorter last batch: left out
    assert int(state.step) == 1 and history.stopped is not None

    def unlike():
        yield train[0][:20], train[1][:20]
        yield train[0][:20, :5], train[1][:20]

    with pytest.raises(StreamError, match=r"batch 2 has .* shapes"):
        fit(_state(), unlike(), steps=2, chunk=2)


def test_evaluate_on_a_stream_equals_arrays(data):
    train, test = data
    state, h = fit(_state(), train, batch_size=40, epochs=1, val_data=SequentialBatches(test, 30))
    a = evaluate(state, test, batch_size=1000)
    b = evaluate(state, SequentialBatches(test, 30))  # 100 = 3 x 30 + 10
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
    assert b["accuracy"] == a["accuracy"]
    # validation streams on the array path and on a stream: the same figures
    np.testing.assert_allclose(h[-1]["val_loss"], a["loss"], rtol=1e-6)
    _, hs = fit(_state(), _stream(train, 40), epochs=1, val_data=SequentialBatches(test, 30))
    assert hs[-1]["val_loss"] == h[-1]["val_loss"]


def test_shards_write_read_and_refuse(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 3, 2)).astype(np.float32)
    y = rng.integers(0, 5, 23)
    src = write_shards(tmp_path / "s", {"x": x, "y": y}, shard_size=5)
    assert len(src) == 23 and len(list((tmp_path / "s").iterdir())) == 10
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    idx = np.asarray([22, 0, 7, 7, 13, 4])
    got = src.gather(idx)
    np.testing.assert_array_equal(got["x"], x[idx])
    np.testing.assert_array_equal(got["y"], y[idx])
    assert isinstance(src.arrays["x"][0], np.memmap)  # read memory-mapped
    np.testing.assert_array_equal(src[9]["x"], x[9])
    with pytest.raises(ConfigError, match="already exists"):
        write_shards(tmp_path / "s", {"x": x})
    with pytest.raises(ConfigError, match="different or zero lengths"):
        write_shards(tmp_path / "bad", [{"x": x, "y": y[:3]}])
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".tmp-bad").exists()
    (tmp_path / "s" / "y-00004.npy").unlink()
    with pytest.raises(ConfigError, match=r"field 'y' lacks shard\(s\) \[4\]"):
        ShardedArrays(tmp_path / "s")
    with pytest.raises(ConfigError, match="holds no FIELD"):
        ShardedArrays(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_shards(f"shards:{tmp_path / 'none'}")


def test_chunk_plan_and_default_chunk():
    # resume at step 7 of 10-step epochs, 18 steps to go, chunks of 4
    assert list(chunk_plan(7, 10, 18, 4)) == [3, 4, 4, 2, 4, 1]
    assert sum(chunk_plan(0, 6, 25, 4)) == 25
    small = (np.zeros((100, 40), np.float32), np.zeros(100, np.int32))
    big = np.zeros((128, 32, 32, 3), np.float32)  # 1.5 MiB a batch
    assert default_chunk(small, 1000) == 64 and default_chunk(small, 10) == 10
    assert default_chunk(big, 1000) == 42


# -- the CLI: shards on disk, Grain, SIGKILL and resume, a failing source ------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards") / "ds"
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 60)):
        y = rng.integers(0, 3, n).astype(np.int64)
        x = (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32)
        write_shards(root / split, {"x": x, "y": y}, shard_size=70)
    return root


def _args(shards):
    return [
        "--dataset", f"shards:{shards}",
        "--model", "mlp(features=(16,), dropout=0.2)",
        "--optimizer", "momentum | clip_global_norm(1.0)",
        "--lr", "0.05", "--schedule", "cosine",
        "--batch-size", "25", "--epochs", "6", "--checkpoint-every", "2",
        "--loader", "grain", "--chunk", "3", "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shard_reference(shards, tmp_path_factory):
    pytest.importorskip("grain")
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *_args(shards), "--out", str(out)]) == 0
    return out


def _final(run: Path):
    import orbax.checkpoint as ocp

    last = list_checkpoints(run / "checkpoints")[-1]
    ckptr = ocp.StandardCheckpointer()
    arrays = ckptr.restore(last.absolute() / "state")
    ckptr.close()
    return last.name, arrays


def _assert_same_run(a: Path, b: Path):
    (na, pa), (nb, pb) = _final(a), _final(b)
    assert na == nb == "epoch-000006"
    _same(pa, pb)
    ra = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == list(range(1, 7))
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb]


def _driver(mode: str, n: int, args: list[str]):
    return subprocess.run(
        [sys.executable, str(HERE / "fault_driver.py"), mode, str(n), "--", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_shards_run_keeps_the_iterator_state_in_every_checkpoint(shard_reference):
    # 270 training examples (10% held out), batch 25: 10 steps an epoch
    for ckpt in list_checkpoints(shard_reference / "checkpoints"):
        meta = read_meta(ckpt)
        assert meta["history"][-1]["data_state"] == {"next_index": meta["step"]}
    summary = json.loads((shard_reference / "summary.json").read_text())
    assert summary["steps"] == 60 and np.isfinite(summary["test_loss"])


def test_sigkill_mid_epoch_on_a_grain_stream_then_resume_is_bit_identical(
    shards, shard_reference, tmp_path
):
    out = tmp_path / "run"
    # chunks of 3 over 10-step epochs: 4 chunks an epoch; the 18th is in epoch 5
    proc = _driver("chunk", 18, [*_args(shards), "--out", str(out)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] in (
        "epoch-000002",
        "epoch-000004",
    )
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_run(shard_reference, out)


def test_a_source_failing_mid_run_stops_with_one_line_and_resumes(
    shards, shard_reference, tmp_path
):
    out = tmp_path / "run"
    proc = _driver("fail", 40, [*_args(shards), "--out", str(out)])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "Input/output error (injected)" in lines[0] and f"--resume {out}" in lines[0]
    assert not (out / "summary.json").exists()
    assert list_checkpoints(out / "checkpoints")  # intact: the resume below verifies them
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_run(shard_reference, out)


def test_a_search_metric_is_checked_on_a_split_read_from_disk(shards, capsys):
    """The validation split of shards is a stream of batches: the metric check traces the
    evaluation on its first batch, before the first trial."""
    base = ["search", "--dataset", f"shards:{shards}", "--model", "mlp(features=(8,))"]
    base += ["--steps", "4", "--trials", "1", "--space", "lr=loguniform(1e-3, 1e-1)"]
    assert main([*base, "--metric", "mse", "--no-progress"]) == 2
    assert "it reports: accuracy, balanced_accuracy, loss, macro_f1" in capsys.readouterr().err
    assert main([*base, "--metric", "val_macro_f1", "--no-progress"]) == 0
    assert "val_macro_f1" in capsys.readouterr().out


def test_bad_stream_options_exit_2(shards, capsys):
    base = ["train", "--dataset", f"shards:{shards}", "--steps", "2", "--no-progress"]
    for extra, match in (
        (["--loader", "torch"], "argument --loader: loader must be one of python, grain"),
        (["--chunk", "0"], "argument --chunk: chunk must satisfy 1 <= chunk"),
        (["--swa", "1"], "argument --swa: swa needs the training data in memory"),
        (["--tta", "3", "--augment", "noise(0.1)"], "argument --tta: tta needs"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err
    assert main(["train", "--dataset", "shards:/nonexistent", "--steps", "2"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_bf16_and_the_divergence_guard_on_a_stream(data):
    train, _ = data
    a, _ = fit(_state(), train, batch_size=40, epochs=2, precision="bf16")
    b, _ = fit(_state(), _stream(train, 40), epochs=2, precision="bf16", chunk=3)
    _same(a.params, b.params)
    # a learning rate that blows up: stopped inside the chunk after 3 skipped steps, the
    # last finite state kept, as on the array path
    tx = optax.sgd(1e8)
    a, ha = fit(_state(tx), train, batch_size=40, epochs=4, max_nonfinite=3)
    b, hb = fit(_state(tx), _stream(train, 40), epochs=4, max_nonfinite=3, chunk=3)
    assert ha.diverged and hb.diverged
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    assert ha.kept_step == hb.kept_step
    _same(a.params, b.params)


def test_a_batch_stream_of_anything_but_epoch_batches_is_refused_in_one_line(data):
    from jtricks.data.stream import SequentialBatches

    train, _ = data
    with pytest.raises(ConfigError, match="got SequentialBatches: it is a stream already"):
        BatchStream(SequentialBatches(train, 40))
    with pytest.raises(ConfigError, match="BatchStream reads EpochBatches"):
        BatchStream([train])


def test_a_one_shot_validation_iterator_is_refused_before_training(data):
    train, test = data
    batches = (tuple(a[i : i + 30] for a in test) for i in range(0, 60, 30))
    state = _state()
    with pytest.raises(ConfigError, match=r"val_data is a one-shot iterator \(generator\)"):
        fit(state, train, batch_size=40, epochs=2, val_data=batches)
    assert int(state.step) == 0  # nothing trained (the state was not consumed)


def test_each_process_reads_its_block_of_every_batch():
    """`EpochBatches(process=(p, 3))`: the three processes' blocks, in process order, are
    the batch one process reads (also when read stacked), from rows of a split; a count
    that does not divide the batch is refused."""
    rng = np.random.default_rng(3)
    source = {"x": rng.normal(size=(50, 2)).astype(np.float32), "y": np.arange(50)}
    rows, key = np.arange(5, 47), jax.random.key(7)
    whole = EpochBatches(source, 6, key, rows=rows)
    parts = [EpochBatches(source, 6, key, rows=rows, process=(p, 3)) for p in range(3)]
    assert all(len(p) == len(whole) == 7 for p in parts)
    for i in (0, 6, 7, 15):  # epochs 0, 1, 2
        got = np.concatenate([p[i]["y"] for p in parts])
        np.testing.assert_array_equal(got, whole[i]["y"])
    stacked = np.concatenate([p.stacked(5, 4)["y"] for p in parts], axis=1)
    np.testing.assert_array_equal(stacked, whole.stacked(5, 4)["y"])
    with pytest.raises(ConfigError, match=r"process=\(0, 4\): a batch of 6 is read by 4"):
        EpochBatches(source, 6, key, process=(0, 4))
