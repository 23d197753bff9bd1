"""One table of bad inputs across the CLI and the Python API: each gives a clear error naming
what is wrong (exit status 2 on the CLI, no traceback) and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import optax
import pytest

import jtricks
from jtricks.cli import main
from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.run import TrainConfig
from jtricks.run.build import within_run
from jtricks.training import create_train_state, fit
from jtricks.training.checkpoint import CheckpointError, restore_latest


def _npz(path, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(60, 6)).astype(np.float32),
        "y": rng.integers(0, 3, 60),
        "x_test": rng.normal(size=(20, 6)).astype(np.float32),
        "y_test": rng.integers(0, 3, 20),
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return f"npz:{path}"


def _nan_x():
    x = np.zeros((60, 6), np.float32)
    x[5, 2] = np.nan
    return x


def _inf_x():
    x = np.zeros((60, 6), np.float32)
    x[0, 0] = np.inf
    return x


# (id, files to write, CLI args, expected message fragment)
CLI_CASES = [
    ("nan-in-data", {"x": _nan_x()}, [], "non-finite values"),
    ("inf-in-data", {"x": _inf_x()}, [], "non-finite values"),
    (
        "test-label-the-training-lacks",  # labels -1, 0, 1 are named classes; 2 is none
        {"y": np.arange(60) % 3 - 1},
        [],
        "y_test holds label(s) [2] that the training labels (-1, 0, 1) lack",
    ),
    ("float-labels", {"y": np.zeros(60, np.float32)}, [], "integer labels"),
    ("string-features", {"x": np.array(["a"] * 60)}, [], "must be numeric"),
    ("shape-mismatch", {"x_test": np.zeros((20, 7), np.float32)}, [], "differ in shape"),
    ("labels-count-mismatch", {"y": np.zeros(59, np.int64)}, [], "60 examples but 59 labels"),
    (
        "empty-dataset",
        {"x": np.zeros((0, 6), np.float32), "y": np.zeros(0, np.int64)},
        [],
        "empty dataset",
    ),
    ("missing-array", {"y_test": None}, [], "lacks array(s) ['y_test']"),
    ("both-spellings", {"y_train": np.zeros(60, np.int64)}, [], "holds both y and y_train"),
    (
        "class-names",
        {"y": np.array(["cat", "dog", "emu"])[np.arange(60) % 3]},
        [],
        "got dtype <U3 (class names are read as labels when y and y_test (and y_val) all ho",
    ),
    ("nonfinite-lr", {}, ["--lr", "inf"], "learning_rate"),
    ("nan-lr", {}, ["--lr", "nan"], "learning_rate"),
    ("nonfinite-val-fraction", {}, ["--val-fraction", "nan"], "val_fraction"),
    ("bad-optimizer-number", {}, ["--optimizer", "adam(eps=-1)"], "eps"),
    ("batch-larger-than-split", {}, ["--batch-size", "500"], "the training split"),
    ("zero-epochs", {}, ["--epochs", "0"], "epochs"),
    ("bad-checkpoint-every", {}, ["--checkpoint-every", "0"], "checkpoint_every"),
    ("bad-early-stopping", {}, ["--early-stopping", "0"], "early_stopping"),
    ("bad-eval-params", {}, ["--eval-params", "best"], "eval_params must be one of"),
    ("eval-params-ema-without-ema", {}, ["--eval-params", "ema"], "give ema"),
    ("group-leaves-a-leaf-out", {}, ["--optimizer", "matrices -> sgd"], "in no parameter group"),
    ("group-misspelt", {}, ["--optimizer", "Dense_9/* -> sgd ; rest -> sgd"], "matches no"),
    ("groups-fused", {}, ["--optimizer", "matrices -> sgd ; rest -> adam", "--fused"], "fused"),
    ("bad-patience-mode", {}, ["--schedule", "plateau(patience_mode='tf')"], "patience_mode"),
    ("bad-norm", {}, ["--model", "mlp(norm='batch_torch')"], "norm must be one of"),
    ("huge-label", {"y": np.r_[np.zeros(59, np.int64), 2**31 - 1]}, [], "outside 1..1,048,576"),
    ("huge-seed", {}, ["--seed", str(10**20)], "argument --seed: seed must satisfy"),
    ("swa-after-the-last-epoch", {}, ["--swa", "99"], "argument --swa: swa=99 starts averaging"),
    (
        "step-records-past-the-end",
        {},
        ["--steps", "5", "--log-every-steps", "6"],
        "argument --log-every-steps: log_every_steps=6 records every 6th step and the run has 5",
    ),
    (
        "profile-past-the-end",
        {},
        ["--steps", "5", "--profile", "6:8"],
        "argument --profile: profile='6:8' starts after the run's last step (5)",
    ),
    ("empty-pipeline-stage", {}, ["--optimizer", "adam | | l2(1e-4)"], "argument --optimizer"),
    ("model-that-does-not-parse", {}, ["--model", "resnet-18"], "did you mean: resnet18"),
    ("complex-features", {"x": np.zeros((60, 6), np.complex64)}, [], "got dtype complex64"),
    ("steps-past-int32", {}, ["--steps", str(2**63 - 1)], "the step counter is an int32"),
    ("epochs-past-int32", {}, ["--epochs", str(2**31)], "the step counter is an int32"),
    (
        "model-past-memory",
        {},
        ["--model", "mlp(features=(1000000000,))"],
        "memory: make it smaller",
    ),
]


@pytest.mark.parametrize(
    ("case", "arrays", "args", "match"), CLI_CASES, ids=[c[0] for c in CLI_CASES]
)
def test_cli_bad_input(tmp_path, capsys, case, arrays, args, match):
    spec = _npz(tmp_path / "data.npz", **arrays)
    out = tmp_path / "run"
    length = [] if {"--epochs", "--steps"} & set(args) else ["--epochs", "1"]
    status = main(
        [
            "train",
            "--dataset",
            spec,
            "--model",
            "mlp(features=(4,))",
            *length,
            "--batch-size",
            "8",
            *args,
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("jtricks train: error: ") and match in err and "Traceback" not in err
    assert not out.exists()  # nothing that could be mistaken for a result


def test_settings_at_the_runs_last_step_or_epoch_are_accepted():
    """`within_run` refuses only what lies past the end: the last step, the last epoch."""
    config = TrainConfig(log_every_steps=5, profile="5:9", swa=2)
    within_run(config, 5, 2)
    for change, param in (({"log_every_steps": 6}, "log_every"), ({"profile": "6"}, "profile")):
        with pytest.raises(ConfigError, match=param):
            within_run(dataclasses.replace(config, **change), 5, 2)


def test_cli_missing_file(tmp_path, capsys):
    assert (
        main(["train", "--dataset", f"npz:{tmp_path}/absent.npz", "--out", str(tmp_path / "r")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_cli_output_dir_holding_another_run(tmp_path, capsys):
    spec = _npz(tmp_path / "data.npz")
    out = tmp_path / "run"
    base = [
        "train",
        "--dataset",
        spec,
        "--model",
        "mlp(features=(4,))",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    assert main([*base, "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*base, "--seed", "3", "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched


@pytest.fixture(scope="module")
def state():
    return create_train_state(
        MLP(num_classes=3, features=(4,)), optax.sgd(0.1), np.zeros((1, 6)), jax.random.key(0)
    )


_DATA = (np.zeros((10, 6)), np.zeros(10, np.int32))

API_CASES = [
    (
        "fit-wrong-rank",
        lambda s: fit(s, (np.zeros(10), np.zeros(10, np.int32)), batch_size=2, epochs=1),
        "shape",
    ),
    (
        "fit-wrong-feature-shape",
        lambda s: fit(
            s,
            (np.zeros((10, 6)), np.zeros(10, np.int32)),
            batch_size=2,
            epochs=1,
            val_data=(np.zeros((4, 5)), np.zeros(4, np.int32)),
        ),
        "validation examples",
    ),
    (
        "fit-label-out-of-range",
        lambda s: fit(s, (np.zeros((10, 6)), np.full(10, 3)), batch_size=2, epochs=1),
        "labels must lie in",
    ),
    (
        "fit-nan",
        lambda s: fit(
            s, (np.full((10, 6), np.nan), np.zeros(10, np.int32)), batch_size=2, epochs=1
        ),
        "non-finite",
    ),
    (
        "fit-empty",
        lambda s: fit(s, (np.zeros((0, 6)), np.zeros(0, np.int32)), batch_size=2, epochs=1),
        "no examples",
    ),
    (
        "fit-batch-too-big",
        lambda s: fit(s, (np.zeros((10, 6)), np.zeros(10, np.int32)), batch_size=11, epochs=1),
        "batch_size",
    ),
    (
        "fit-int-data-key",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, data_key=3),
        r"data_key must be one PRNG key, e\.g\. jax\.random\.key\(0\) .*; got int 3",
    ),
    (
        "fit-float-data-key",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, data_key=np.zeros(2, np.float32)),
        r"data_key must be one PRNG key.*got an array of shape \(2,\) and dtype float32",
    ),
    (
        "fit-one-callback-not-in-a-list",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, callbacks=lambda r, s: None),
        r"callbacks must be a list of callbacks; got function \(one callback: callbacks=\[cb\]\)",
    ),
    (
        "fit-one-callback-object",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, callbacks=jtricks.training.EarlyStopping()),
        r"callbacks must be a list of callbacks; got EarlyStopping \(one callback",
    ),
    (
        "fit-callback-without-on-epoch-end",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, callbacks=[print]),
        r"callbacks\[0\] must have an on_epoch_end\(record, state\) method",
    ),
    (
        "fit-reporter-flag",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, reporter=True),
        "reporter must be a progress reporter .*got bool True, without start, epoch_end, close",
    ),
    (
        "fit-stop-string",
        lambda s: fit(s, _DATA, batch_size=2, epochs=1, stop="now"),
        r"stop must be None, a flag with is_set\(\) .*; got str 'now'",
    ),
    (
        "state-int-key",
        lambda s: create_train_state(MLP(num_classes=3), optax.sgd(0.1), np.zeros((1, 6)), 0),
        r"key must be one PRNG key.*; got int 0",
    ),
    (
        "state-no-optimizer",
        lambda s: create_train_state(MLP(num_classes=3), None, np.zeros((1, 6)), jax.random.key(0)),
        r"tx must be an optax GradientTransformation .* or an optimizer spec .*; got NoneType",
    ),
    (
        "state-function-model",
        lambda s: create_train_state(
            lambda x: x, optax.sgd(0.1), np.zeros((1, 6)), jax.random.key(0)
        ),
        "model must be a Flax Linen module .* or an initialised Flax NNX module; got function",
    ),
    (
        "state-list-of-examples",
        lambda s: create_train_state(
            MLP(num_classes=3), optax.sgd(0.1), [[0.0] * 6], jax.random.key(0)
        ),
        r"sample_x: features must have shape \(N, \.\.\.\) .* \(a list of examples is a pytree",
    ),
    (
        "fit-text-data",
        lambda s: fit(s, "mnist1d", epochs=1),
        r"training data is a str \('mnist1d'\)",
    ),
    (
        "fit-text-val-data",
        lambda s: fit(s, [_DATA, _DATA], val_data="val.npz", epochs=1),
        r"validation data is a str \('val.npz'\): give arrays",
    ),
    (
        "evaluate-bytes",
        lambda s: jtricks.evaluate(s, b"x"),
        r"evaluation data is a bytes \(b'x'\)",
    ),
    ("train-nonfinite-lr", lambda s: jtricks.train(learning_rate=float("nan")), "learning_rate"),
    ("train-bool-lr", lambda s: jtricks.train(learning_rate=True), "learning_rate"),
    (
        "train-unknown-key",
        lambda s: jtricks.train(lr=0.1),
        r"unknown config key\(s\) \['lr'\]; lr is the flag --lr: give learning_rate=\.\.\.; valid",
    ),
    ("train-string-seed", lambda s: jtricks.train(seed="0"), "seed"),
    (
        "train-module-object",
        lambda s: jtricks.train(model=MLP(num_classes=3)),
        r"model must be a spec string; got an object of type MLP: .*import path \('mymodels:Net",
    ),
    (
        "train-arrays-as-dataset",
        lambda s: jtricks.train(dataset=np.zeros((3000, 4))),
        r"dataset must be a spec string, a jtricks.data.Dataset, a dict of arrays x, y, x_test, "
        r"y_test or a tuple \(x, y, x_test, y_test\); got an object of type ndarray",
    ),
    (
        "optimizer-built-transform",
        lambda s: jtricks.train(optimizer=optax.adamw(1e-3)),
        "optimizer is an optax GradientTransformation, already built .*lambda learning_rate",
    ),
    (
        "optimizer-nonfinite",
        lambda s: jtricks.build_optimizer("sgd", float("inf")),
        "learning_rate",
    ),
    (
        "schedule-nan",
        lambda s: jtricks.optim.build_schedule(
            "per_epoch(factor=float('nan'))", 0.1, steps_per_epoch=1, total_steps=1
        ),
        "cannot parse",
    ),
    ("model-bad-dropout", lambda s: jtricks.build_model("mlp(dropout=-0.1)", 3), "dropout"),
    ("dataset-bad-shape", lambda s: jtricks.load_dataset("synthetic(shape=(3, -1))"), "shape"),
    ("dataset-empty", lambda s: jtricks.load_dataset("synthetic(num_train=0)"), "num_train"),
]


@pytest.mark.parametrize(("case", "call", "match"), API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(state, case, call, match):
    with pytest.raises(ConfigError, match=match):
        call(state)
    jtricks.training.state.check_live(state)  # refused before anything was donated


def test_a_function_optimizer_is_refused_with_a_folder_before_the_folder_exists(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"optimizer=<function .* config.json.*'mymodule:make'"):
        jtricks.train(optimizer=lambda learning_rate: optax.sgd(learning_rate), out=out)
    assert not out.exists()


def test_api_checkpoint_for_another_model(tmp_path):
    spec = _npz(tmp_path / "data.npz")
    out = tmp_path / "run"
    jtricks.train(dataset=spec, model="mlp(features=(4,))", epochs=2, batch_size=8, out=out)
    other = create_train_state(
        MLP(num_classes=3, features=(5,)), optax.sgd(0.1), np.zeros((1, 6)), jax.random.key(0)
    )
    with pytest.raises(CheckpointError, match="does not match the model"):
        restore_latest(out / "checkpoints", other)
    shutil.rmtree(out)


def test_position_arguments_of_streams_are_refused_for_arrays():
    x, y = np.zeros((20, 6), np.float32), np.zeros(20, np.int64)
    state = create_train_state(
        MLP(num_classes=3, features=(4,)), optax.sgd(0.1), x, jax.random.key(0)
    )
    for kw, name in (
        ({"data_state": {"next_index": 5}}, "data_state"),
        ({"steps_per_epoch": 3}, "steps_per_epoch"),
    ):
        with pytest.raises(ConfigError, match=f"{name}=.* is for a stream of batches") as e:
            fit(state, (x, y), batch_size=5, epochs=1, **kw)
        assert e.value.param == name
    with pytest.raises(ConfigError, match="would run to step") as e:
        fit(state, (x, y), batch_size=5, steps=2**31)
    assert e.value.param == "steps"


def test_output_folders_that_cannot_be_written_are_one_line(tmp_path, monkeypatch):
    """A name too long for the file system, and a folder that cannot be written (a
    read-only mount, simulated: the probe file fails as it would there)."""
    import errno
    import tempfile

    from jtricks.rundir import create_run_dir

    with pytest.raises(
        ConfigError, match=r"cannot write output folder .*: File name too long"
    ) as e:
        create_run_dir(tmp_path / ("a" * 300))
    assert e.value.param == "out"
    empty = tmp_path / "empty"
    empty.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"cannot write output folder .*: Read-only file system"):
        create_run_dir(empty)
