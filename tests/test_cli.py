"""The `jtricks train` command and the public `jtricks.train` function: run folder, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import jtricks
from jtricks.cli import main
from jtricks.errors import ConfigError

TINY = [
    "--dataset",
    "synthetic(num_train=120, num_test=60, shape=(8,), num_classes=3, noise=0.3)",
    "--model",
    "mlp(features=(8,))",
]


def test_train_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "3", "--batch-size", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch   3" in printed and "test_accuracy" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.json",
        "confusion.png",
        "curves.png",
        "metrics.jsonl",
        "summary.json",
    ]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("epoch-")] == [
        "epoch-000003"
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["epochs"] == 3 and config["environment"]["platform"] == "cpu"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_accuracy", "steps_per_s"} <= set(lines[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CLI and the Python function give the same run
    result = jtricks.train(dataset=TINY[1], model=TINY[3], epochs=3, batch_size=20)
    np.testing.assert_allclose(result.test["accuracy"], summary["test_accuracy"])
    np.testing.assert_allclose(result.history["val_loss"], [r["val_loss"] for r in lines])


@pytest.mark.parametrize(
    "optimizer",
    [
        "sgd(lr=0.5) | clip_global_norm(1.0) | l2(1e-4)",
        "momentum(form='damped', nesterov=True) | clip_per_leaf_norm(1.0) | weight_decay(1e-3)",
        "adagrad | clip_by_value(0.5) | elastic_net(1e-4, 0.5)",
        "normalized_sgd | l1(1e-4, form='proximal')",
        "rmsprop(centered=True, momentum=0.5) | clip_global_norm_unit(2.0) | l1(1e-5)",
        "adamw(weight_decay=1e-3)",
        "adadelta(lr=1.0)",
    ],
)
def test_every_optimizer_and_transform_from_the_cli(tmp_path, optimizer):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "--epochs",
                "2",
                "--batch-size",
                "20",
                "--lr",
                "0.05",
                "--optimizer",
                optimizer,
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in lines)


@pytest.mark.parametrize(
    ("schedule", "check"),
    [
        ("per_epoch(factor=0.5)", lambda lr: np.allclose(lr, [0.05, 0.025, 0.0125], rtol=1e-5)),
        (
            "step(epochs=(2,), factor=0.1)",
            lambda lr: np.allclose(lr, [0.05, 0.05, 0.005], rtol=1e-5),
        ),
        ("cosine", lambda lr: lr[0] > lr[1] > lr[2] > 0),
        ("warmup(epochs=2)", lambda lr: lr[0] < lr[1] < lr[2] == pytest.approx(0.05)),
    ],
)
def test_schedules_from_the_cli(tmp_path, schedule, check):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "--epochs",
                "3",
                "--batch-size",
                "20",
                "--lr",
                "0.05",
                "--schedule",
                schedule,
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lr = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert check(np.array(lr)), lr


def test_reduce_on_plateau_lowers_the_learning_rate():
    # min_delta=100: no epoch after the first counts as an improvement, so with patience 1
    # the rate halves after every epoch from the second on, down to min_scale
    result = jtricks.train(
        dataset=TINY[1],
        model=TINY[3],
        optimizer="sgd",
        learning_rate=0.1,
        epochs=6,
        batch_size=20,
        schedule="plateau(factor=0.5, patience=1, min_delta=100.0, min_scale=0.1)",
    )
    np.testing.assert_allclose(
        result.history["lr"], [0.1, 0.1, 0.05, 0.025, 0.0125, 0.01], rtol=1e-6
    )


def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "precious\n"


BAD = [
    (["--dataset", "imagenet"], "--dataset", "mnist1d, npz, regression, segmentation1d, synthetic"),
    (
        ["--model", "vgg"],
        "--model",
        "cnn, cnn_wide, densenet, densenet1d, fcn1d, gru, inception, inception1d, lstm, mlp, resnet18, resnet20, transformer, transformer_lm",
    ),
    (
        ["--optimizer", "lion"],
        "--optimizer",
        "adadelta, adagrad, adam, adamw, momentum, normalized_sgd, rmsprop, sgd",
    ),
    (["--optimizer", "adam(beta=0.9)"], "--optimizer", "valid arguments are"),
    (["--optimizer", "adam | clip(1)"], "--optimizer", "valid transforms are: clip_by_value"),
    (["--optimizer", "adam | sgd"], "--optimizer", "exactly one optimizer"),
    (["--optimizer", "momentum(gamma=1.5)"], "--optimizer", "gamma"),
    (["--schedule", "linear"], "--schedule", "valid schedules are: constant, cosine, exponential"),
    (["--schedule", "step(epochs=(1, 2), factor=-1)"], "--schedule", "factor"),
    (["--schedule", "step(epochs=(30, 60))"], "--schedule", "so the rate would never drop"),
    (["--schedule", "warmup_cosine(warmup_epochs=1)"], "--schedule", "would never decay"),
    (["--schedule", "plateau(monitor='val_f1')"], "--schedule", "monitor"),
    (["--lr", "0"], "--lr", "learning_rate"),
    (["--lr", "-0.1"], "--lr", "learning_rate"),
    (["--lr", "nan"], "--lr", "learning_rate"),
    (["--batch-size", "0"], "--batch-size", "batch_size"),
    (["--batch-size", "1000"], "--batch-size", "<= 108 (the training split)"),
    (["--epochs", "0"], "--epochs", "epochs"),
    (["--steps", "-5"], "--steps", "steps"),
    (["--val-fraction", "0"], "--val-fraction", "val_fraction"),
    (["--val-fraction", "1"], "--val-fraction", "val_fraction"),
    (["--val-fraction", "1.5"], "--val-fraction", "val_fraction"),
    (["--preprocess", "whiten"], "--preprocess", "minmax, none, standardize"),
    (["--seed", "-1"], "--seed", "seed"),
    (["--label-smoothing", "1"], "--label-smoothing", "label_smoothing"),
    (["--label-smoothing", "-0.1"], "--label-smoothing", "label_smoothing"),
    (["--eval-batch-size", "0"], "--eval-batch-size", "eval_batch_size"),
    (["--dataset", "synthetic(noise=-1)"], "--dataset", "noise"),
    (["--dataset", "synthetic(shape=(0, 3))"], "--dataset", "shape"),
    (["--model", "mlp(dropout=1.5)"], "--model", "dropout"),
    (["--model", "mlp(features=(8,)"], "--model", "cannot parse"),
    (
        ["--model", "transformer_lm(d_model=8, heads=2, layers=1)"],
        "--model",
        "cannot be initialised on examples of shape and dtype",
    ),
    (["--optimizer", "muon"], "--optimizer", "did you mean 'contrib.muon'?"),
    (  # the case as a researcher types it: a token model on the default dataset
        ["--dataset", "mnist1d", "--model", "transformer_lm"],
        "--model",
        "cannot be initialised on examples of shape and dtype (40,) float32",
    ),
]


@pytest.mark.parametrize(("args", "flag", "listed"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_cli_input_exits_2_with_message(tmp_path, capsys, args, flag, listed):
    out = tmp_path / "run"
    base = (
        TINY
        if not any(a in ("--dataset", "--model") for a in args)
        else [
            a
            for pair in zip(TINY[::2], TINY[1::2], strict=True)
            if pair[0] not in args
            for a in pair
        ]
    )
    length = [] if any(a in ("--epochs", "--steps") for a in args) else ["--epochs", "1"]
    status = main(["train", *base, *length, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("jtricks train: error: ")
    assert flag in err and listed in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    "args",
    [["--epochs", "1", "--steps", "2"], ["--lr", "abc"], ["--batch-size", "2.5"], ["--frobnicate"]],
)
def test_argparse_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_console_script_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jtricks.cli",
            "train",
            "--model",
            "resnet999",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        "unknown model 'resnet999'; valid models are: cnn, cnn_wide, densenet, densenet1d, fcn1d, gru, inception, inception1d, lstm, mlp, resnet18, resnet20, transformer, transformer_lm"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_python_api_errors():
    with pytest.raises(ConfigError, match="learning_rat: did you mean: learning_rate"):
        jtricks.train(learning_rat=0.1)
    with pytest.raises(ConfigError, match=r"no_stratify is the flag --no-stratify: give strat"):
        jtricks.train(no_stratify=True)
    with pytest.raises(ConfigError, match=r"a recipe is a config: jtricks.train\(jtricks.run.rec"):
        jtricks.train(recipe="tricks")
    with pytest.raises(ConfigError, match="epochs or steps, not both"):
        jtricks.train(epochs=1, steps=1)
    with pytest.raises(ConfigError, match="unknown config key"):
        jtricks.TrainConfig.from_dict({"model": "mlp", "layers": 3})
    assert jtricks.TrainConfig.from_dict({"model": "mlp"}).model == "mlp"


def test_label_smoothing_trains_and_reports_the_smoothed_loss():
    """``label_smoothing=s``: the reported test loss is ``-sum_c q_c log p_c`` with
    ``q = (1 - s) one_hot + s / C``, checked in numpy float64 from the final model's logits."""
    from jtricks.data import load_dataset

    s, spec = 0.2, "synthetic(num_train=120, num_test=60, shape=(8,), num_classes=3, noise=0.3)"
    result = jtricks.train(
        dataset=spec, model=TINY[3], epochs=2, batch_size=20, preprocess="none", label_smoothing=s
    )
    data = load_dataset(spec)
    params = result.state.params  # an MLP: no batch statistics, no dropout
    logits = np.asarray(result.state.apply_fn({"params": params}, data.x_test), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    logp -= logits.max(1, keepdims=True)
    q = (1 - s) * np.eye(3)[data.y_test] + s / 3
    np.testing.assert_allclose(result.test["loss"], -(q * logp).sum(1).mean(), rtol=1e-5)
    plain = -logp[np.arange(len(data.y_test)), data.y_test].mean()
    assert abs(result.test["loss"] - plain) > 1e-3


def test_cli_keeps_compiled_programs_in_the_cache_folder(tmp_path):
    """A run through the console script leaves its compiled epoch in ``<cache>/xla`` (JAX's
    persistent compilation cache); ``JTRICKS_COMPILATION_CACHE=0`` turns that off."""
    import os

    env = {
        **os.environ,
        "JTRICKS_CACHE_DIR": str(tmp_path / "cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "jtricks.cli", "train", *TINY, "--epochs", "1", "--no-progress"]
    subprocess.run([*cmd, "--out", str(tmp_path / "a")], env=env, check=True, capture_output=True)
    assert any(p.name.startswith("jit_run_part") for p in (tmp_path / "cache" / "xla").iterdir())
    env["JTRICKS_CACHE_DIR"] = str(tmp_path / "off")
    env["JTRICKS_COMPILATION_CACHE"] = "0"
    subprocess.run([*cmd, "--out", str(tmp_path / "b")], env=env, check=True, capture_output=True)
    assert not (tmp_path / "off" / "xla").exists()


def test_recipe_sets_its_fields_and_flags_override_them(tmp_path, capsys):
    from jtricks.run import RECIPES, recipe

    config = recipe("tricks", seed=3)
    assert {k: getattr(config, k) for k in RECIPES["tricks"]} == RECIPES["tricks"]
    assert config.seed == 3 and recipe("tricks", epochs=2).steps is None
    with pytest.raises(ConfigError, match=r"or tta_augment \(tta=33 set by recipe 'tricks'; give"):
        recipe("tricks", augment=None)  # a refusal names what the recipe set
    assert recipe("tricks", augment=None, tta=1).augment is None
    out = tmp_path / "run"
    args = ["train", "--recipe", "tricks", "--steps", "40", "--tta", "3", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["steps"] == 40 and saved["tta"] == 3  # the flags win
    assert saved["augment"] == RECIPES["tricks"]["augment"]  # the rest is the recipe's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta_views"] == 3 and summary["num_params"] <= 6000
    assert "single-view test_accuracy" in capsys.readouterr().out
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "tricks, tricks_wide" in capsys.readouterr().err


def test_a_typed_flag_overrides_the_recipe_even_at_its_default(monkeypatch):
    """``--recipe tricks --tta 1`` turns the recipe's TTA off although 1 is the default."""
    import jtricks.run

    seen = []

    class Captured(Exception):
        pass

    def fake_train(config, **kwargs):
        seen.append(config)
        raise Captured

    monkeypatch.setattr(jtricks.run, "train", fake_train)
    for extra, expect in [([], 33), (["--tta", "1"], 1), (["--tta=1"], 1)]:
        with pytest.raises(Captured):
            main(["train", "--recipe", "tricks", *extra, "--checkpoint-every", "10"])
        assert seen[-1].tta == expect and seen[-1].checkpoint_every == 10
        assert seen[-1].augment == "shift(2) | trend(1.0)"


@pytest.mark.parametrize("targets", [1, 2])
def test_an_npz_with_real_targets_trains_a_regression(tmp_path, capsys, targets):
    """Real-valued targets in a user's .npz are a regression (the file's own task, one
    output per target), and train with --task regression to a test MSE well below the
    targets' mean square (the map is learnable)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, targets))

    def split(n):
        x = rng.normal(size=(n, 5)).astype(np.float32)
        y = (x @ w).astype(np.float32)
        return x, (y[:, 0] if targets == 1 else y)

    (x, y), (xt, yt) = split(80), split(30)
    path = tmp_path / "reg.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    data = jtricks.load_dataset(f"npz:{path}")
    assert (data.task, data.num_classes, data.y_train.dtype) == ("regression", targets, np.float32)
    out = tmp_path / "run"
    args = ["train", "--dataset", f"npz:{path}", "--task", "regression", "--model"]
    args += ["mlp(features=(16,))", "--batch-size", "16", "--epochs", "30", "--lr", "0.01"]
    args += ["--preprocess", "none", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["test_mse"] < 0.5 * float(np.mean(yt**2))  # it learned the map
    capsys.readouterr()


def test_out_of_device_memory_is_one_line(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED (what a batch too large for the device raises at run
    time, past the model-size estimate) is one line with exit status 2."""
    import jax

    import jtricks.cli as cli

    def exhausted(args, flags):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 64.00GiB.\n"
            "BufferAssignment OOM Debugging."
        )

    monkeypatch.setattr(cli.commands()["train"], "run", exhausted)
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory" in err[0] and "allocate 64.00GiB" in err[0]
