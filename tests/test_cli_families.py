"""Every model family trains from the CLI, and the small benchmarks print JSON (tiny
sizes; split from test_examples.py so the two files run on separate test workers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "model",
    [
        "cnn_wide(widths=(8, 16), blocks=1)",
        "resnet20(stage_sizes=(1, 1, 1), widths=(4, 8, 8))",
        "resnet18(widths=(4, 4, 8, 8))",
        "lstm(hidden=8, bidirectional=True)",
        "gru(hidden=8, layers=2, norm='layer', dropout=0.1)",
        "transformer(d_model=8, heads=2, layers=1, dropout=0.1)",
        "mlp(norm='weight', residual=True, features=(16, 16))",
    ],
)
def test_every_model_family_trains_from_the_cli(tmp_path, model):
    from jtricks.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "mnist1d(num_samples=300)",
                "--model",
                model,
                "--steps",
                "6",
                "--batch-size",
                "32",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["test_loss"])


@pytest.mark.parametrize(
    "script, args, keys",
    [
        (
            "bench_augment.py",
            ["--epochs", "1", "--repeats", "1", "--model", "mlp(features=(8,))"],
            ("overhead",),
        ),
        (
            "bench_scaling.py",
            [
                "--devices",
                "1,2",
                "--epochs",
                "1",
                "--repeats",
                "1",
                "--model",
                "mlp(features=(8,))",
            ],
            ("ratio_vs_first",),
        ),
        (
            "bench_imbalance.py",
            [
                *("--steps", "20", "--seeds", "1", "--imbalance", "10"),
                *("--model", "mlp(features=(8,))", "--arms", "plain,logit_adjust=1"),
            ],
            ("gain_over_plain",),
        ),
        (
            "bench_fit_calls.py",
            ["--examples", "400", "--features", "8", "--steps", "2", "--repeats", "1"],
            ("ratio_to_hand_written", "median_ms"),
        ),
    ],
)
def test_small_benchmarks_print_json(tmp_path, script, args, keys):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.splitlines()[0])
    assert all(np.all(np.isfinite(pd_values(first[k]))) for k in keys)
    assert json.loads(out.read_text()) == first


def test_bench_guard_arms_do_the_hand_steps_work_and_count_the_guards_kernels(tmp_path):
    """`benchmarks/bench_guard.py`, tiny: every arm (jtricks' step with and without the
    guard and the norms) ends the epoch with the hand-written step's parameters (a second
    code path for the same work), and the kernels it counts grow as the step grows."""
    out = tmp_path / "guard.json"
    args = ["--model", "mlp(features=(8,))", "--shape", "4", "--num-classes", "3"]
    args += ["--batch-size", "8", "--steps", "3", "--repeats", "1", "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_guard.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    arms = json.loads(out.read_text())["arms"]
    assert list(arms) == ["hand", "plain", "norms", "guard", "default"]
    for name, arm in arms.items():
        assert arm["max_param_diff_vs_hand"] < 1e-6, name
        assert np.isfinite(arm["median_ms"]) and np.isfinite(arm["ratio_to_hand"]), name
    kernels = {name: arm["kernels_per_step"] for name, arm in arms.items()}
    # the guard selects each of the 4 parameter leaves and Adam's two moments of each
    assert kernels["guard"] - kernels["plain"] >= 3 * 4, kernels
    assert kernels["plain"] < kernels["norms"] <= kernels["default"], kernels
    assert kernels["guard"] <= kernels["default"], kernels


def pd_values(v):
    """Numbers inside a benchmark field (a number, or a list of {name: number})."""
    if isinstance(v, dict):
        return [x for x in v.values() if isinstance(x, int | float)]
    if isinstance(v, list):
        return [x for d in v for x in d.values() if isinstance(x, int | float)]
    return v
