"""Tiny versions of the examples and benchmarks, so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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


def test_bench_fit_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_fit.py"),
            "--model",
            "mlp(features=(8,))",
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.splitlines()[0])
    assert first["fit_steps_per_s_median"] > 0 and first["hand_scan_steps_per_s_median"] > 0
    assert (
        abs(
            first["ratio_fit_over_hand"]
            - first["fit_steps_per_s_median"] / first["hand_scan_steps_per_s_median"]
        )
        < 1e-9
    )
    assert json.loads(out.read_text())["environment"]["platform"] == "cpu"
    assert "ratio fit / hand" in proc.stdout


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
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert "test acc" in capsys.readouterr().out
