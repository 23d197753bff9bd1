"""Tiny versions of the examples and benchmarks, so they cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist1d_paper_example_tiny(capsys):
    example = _load(ROOT / "examples" / "mnist1d_paper.py")
    accs = example.main(["--steps", "40", "--seeds", "1", "--dataset", "mnist1d(num_samples=500)"])
    out = capsys.readouterr().out
    assert set(accs) == {"cnn", "mlp"} and all(len(v) == 1 for v in accs.values())
    assert "within 2 points" in out and "cnn seed 0: test accuracy" in out
    assert all(acc > 15 for v in accs.values() for acc in v)  # 10 classes: chance is 10%


def test_clipping_and_decay_example_tiny(capsys):
    example = _load(ROOT / "examples" / "clipping_and_decay.py")
    rows = example.main(["--epochs", "1"])
    by_run = {r["run"]: r for r in rows}
    assert by_run["no clipping, no decay"]["non_finite"]
    assert not by_run["clip_global_norm(0.2)"]["non_finite"]
    assert not by_run["lr decay exp(-t)"]["non_finite"]
    assert "NaN/inf" in capsys.readouterr().out


def test_optimizers_example_tiny(capsys):
    example = _load(ROOT / "examples" / "optimizers.py")
    rows = example.main(
        ["--steps", "20", "--model", "mlp(features=(16,))", "--dataset", "mnist1d(num_samples=500)"]
    )
    assert [r["optimizer"] for r in rows] == [s for s, _ in example.OPTIMIZERS]
    # 20 steps: the adaptive optimizers are past chance (10 classes: 10%) already
    best = max(r["test_accuracy"] for r in rows)
    assert best > 0.2 and all(np.isfinite(r["test_accuracy"]) for r in rows)
    assert "test acc" in capsys.readouterr().out


def test_initialization_example_signal_propagation():
    example = _load(ROOT / "examples" / "initialization.py")
    table = {(a, n, g): s for a, n, g, s in example.rows(depth=50)}
    within = lambda s: bool(np.all((s["std"] >= 0.5) & (s["std"] <= 2.0)))  # noqa: E731
    for name in ("he_normal", "he_uniform"):
        assert within(table[("relu", name, 1.0)]), name
    for name in ("lecun_normal", "glorot_uniform"):
        assert within(table[("tanh", name, example.TANH_GAIN)]), name
        assert not within(table[("relu", name, 1.0)])  # variance 1/n halves a ReLU signal per layer
    assert example.verdict(table[("relu", "standard_normal", 1.0)], "relu") == "explodes"
    assert example.verdict(table[("tanh", "standard_normal", 1.0)], "tanh") == "saturates"
    # LeCun with tanh at gain 1 shrinks like 1/sqrt(2 l) (tanh(x) ~ x - x^3/3 gives q_{l+1} ~ q_l - 2 q_l^2)
    std = table[("tanh", "lecun_normal", 1.0)]["std"]
    layers = np.arange(10, 51)
    np.testing.assert_allclose(std[layers - 1], 1 / np.sqrt(2 * layers), rtol=0.15)


def test_batchnorm_dropout_example_tiny(capsys):
    example = _load(ROOT / "examples" / "batchnorm_dropout.py")
    rows = example.main(["--steps", "30", "--seeds", "1", "--dataset", "mnist1d(num_samples=500)"])
    assert [r["config"] for r in rows] == [c for c, _ in example.CONFIGS]
    assert "gap" in capsys.readouterr().out


def test_diagnostics_example_tiny(capsys, tmp_path):
    example = _load(ROOT / "examples" / "diagnostics.py")
    verdicts = example.main(
        [
            "--dataset",
            "mnist1d(num_samples=500)",
            "--signal-steps",
            "0,20",
            "--lr-steps",
            "5",
            "--out",
            str(tmp_path / "diag"),
        ]
    )
    out = capsys.readouterr().out
    assert all(verdicts.values()), verdicts
    assert "wrong custom_vjp caught" in out and "FAIL" in out


def test_augmentation_example_tiny(capsys):
    example = _load(ROOT / "examples" / "augmentation.py")
    res = example.main(["--steps", "30", "--seeds", "1", "--dataset", "mnist1d(num_samples=500)"])
    out = capsys.readouterr().out
    assert set(res) == {"none", "augmented"} and "gain in test accuracy" in out
    assert all(len(v["test"]) == 1 and v["test"][0] > 15 for v in res.values())


def test_transfer_example_tiny(capsys):
    example = _load(ROOT / "examples" / "transfer.py")
    accs = example.main(
        ["--pretrain-steps", "30", "--steps", "20", "--per-class", "10", "--seeds", "1"]
    )
    out = capsys.readouterr().out
    assert set(accs) == {"scratch", "head", "last:2", "all"} and "Conv_2, head" in out
    assert all(len(v) == 1 and v[0] > 15 for v in accs.values())  # chance: 10%


def test_ensembles_example_tiny(capsys):
    example = _load(ROOT / "examples" / "ensembles.py")
    rows = example.main(
        [
            "--steps",
            "72",
            "--members",
            "2",
            "--swa-epoch",
            "1",
            "--dataset",
            "mnist1d(num_samples=500)",
        ]
    )
    out = capsys.readouterr().out
    assert "ensemble of 2" in out and len(rows) == 5
    # 72 steps: the trained weights are past chance (10%); the EMA of decay 0.999 is not
    # (it still weighs the initial weights at 0.999**72 = 93%), as the example's text says
    learned = ("single", "swa (from epoch 1)", "ensemble of 2", "ensemble member (mean of 2)")
    assert all(rows[k] > 25 for k in learned) and rows["ema (0.999)"] < rows["single"]


def test_task_examples_tiny(capsys):
    reg = _load(ROOT / "examples" / "regression.py").main(
        [
            "--steps",
            "30",
            "--dataset",
            "regression(num_train=300, num_test=100)",
            "--model",
            "mlp(features=(8,))",
        ]
    )
    assert len(reg) == 3 and all(r["floor"] == pytest.approx(0.01) for r in reg)
    seg = _load(ROOT / "examples" / "segmentation.py").main(
        [
            "--steps",
            "10",
            "--dataset",
            "segmentation1d(num_train=120, num_test=40)",
            "--model",
            "fcn1d(channels=(4,), dilations=(1,))",
        ]
    )
    assert [r["config"] for r in seg] == ["cross-entropy", "cross-entropy + Dice"]
    lm = _load(ROOT / "examples" / "language_model.py").main(
        [
            "--steps",
            "10",
            "--dataset",
            "tokens(num_train=120, num_test=40, seq_len=8)",
            "--model",
            "transformer_lm(d_model=8, heads=2, layers=1)",
        ]
    )
    assert all(r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-5) for r in lm)
    nnx_result = _load(ROOT / "examples" / "nnx_model.py").main(
        ["--epochs", "1", "--dataset", "mnist1d(num_samples=500)"]
    )
    # conv 1->32 k5 (no bias) + BN + conv 32->32 k3 (no bias) + BN + linear 32*10 -> 10
    assert nnx_result["params"] == 1 * 32 * 5 + 2 * 32 + 32 * 32 * 3 + 2 * 32 + 320 * 10 + 10
    out = capsys.readouterr().out
    assert (
        "gap to floor" in out and "mean IoU" in out and "entropy rate" in out and "NNX CNN" in out
    )


def test_streaming_example_tiny(capsys):
    example = _load(ROOT / "examples" / "streaming.py")
    out = example.main(["--epochs", "2"])
    assert out["identical"] and out["identical_resumed"]
    assert out["val_loss_memory"] == out["val_loss_stream"]
    assert "identical parameters: True" in capsys.readouterr().out
