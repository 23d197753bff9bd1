"""`benchmarks/gpu_suite.py --tiny`: every part's code path at toy size on the CPU, so the
suite that a rare GPU run depends on cannot rot. One run serves all the checks."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PART_FILES = (
    "fit",
    "train_step",
    "train",
    "ensemble",
    "lr_finder",
    "optimizer_update",
    "sweep",
    "step_records",
)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "gpu-suite-tiny"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {name: json.loads((out / f"{name}.json").read_text()) for name in PART_FILES}
    return out, proc.stdout, parts


def _result(parts: dict, part: str, label: str | None = None) -> dict:
    runs = [r for r in parts[part]["runs"] if label is None or r["label"] == label]
    assert runs and runs[0]["status"] == "ok", runs
    return runs[0]["result"]


def test_tiny_suite_writes_every_part_and_a_summary(suite_run):
    out, stdout, parts = suite_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 10 and not [f for f in files if f.startswith(".")], files
    assert files == sorted([*(f"{n}.json" for n in PART_FILES), "bench_quick.json", "summary.md"])
    md = (out / "summary.md").read_text()
    for heading in ("## Targets", "## optimizer_update", "## train_step", "## ensemble"):
        assert heading in md
    assert "## lr_finder" in md and "## fit" in md and "## jtricks bench" in md
    assert "## sweep" in md and "## step_records" in md and "## fit calls" in md
    assert "## fit guard" in md
    for name, rec in parts.items():
        assert rec["part"] == name and rec["tiny"] is True
        assert rec["suite_environment"]["versions"]["jax"]
        for run in rec["runs"]:
            # without torch (CI) its arm is skipped here; the script's own logic runs on a
            # stand-in torch in test_the_torch_baseline_runs_its_logic_on_a_stand_in_torch
            assert run["status"] == "ok" or run["status"].startswith("skipped (torch"), run
    assert "[train_step/jax] ok in" in stdout and "gpu_suite: done in" in stdout


def test_tiny_suite_figures_are_consistent(suite_run):
    """Each headline ratio recomputed from the raw times the part recorded."""
    _, _, parts = suite_run
    steps = _result(parts, "step_records")
    base = statistics.median(steps["arms"]["none"]["times_s"])
    for arm in steps["arms"].values():
        assert arm["ratio_time_vs_none"] == pytest.approx(statistics.median(arm["times_s"]) / base)
    assert steps["arms"]["steps_every_1"]["step_records"] == steps["steps_per_repeat"]
    ahead = _result(parts, "step_records", "callbacks")
    waits = statistics.median(ahead["arms"]["waits"]["times_s"])
    for arm in ahead["arms"].values():  # the same training, whoever waits for whom
        assert arm["speed_vs_waits"] == pytest.approx(waits / statistics.median(arm["times_s"]))
        assert arm["max_param_diff"] == 0.0
    calls = _result(parts, "fit", "calls")
    hand = statistics.median(calls["times_s"]["hand-written"])
    for arm, times in calls["times_s"].items():
        ratio = calls["ratio_to_hand_written"][arm]
        assert ratio == pytest.approx(statistics.median(times) / hand)
        assert calls["median_ms"][arm] == pytest.approx(1e3 * statistics.median(times))
    assert calls["val_examples"] == 50
    guard = _result(parts, "fit", "guard")
    hand = statistics.median(guard["arms"]["hand"]["times_s"])
    for name, arm in guard["arms"].items():
        assert arm["ratio_to_hand"] == pytest.approx(hand / statistics.median(arm["times_s"]))
        assert arm["max_param_diff_vs_hand"] < 1e-6, name
    sweep = _result(parts, "sweep")
    fresh, build = sweep["arms"]["fresh"], sweep["arms"]["build"]
    assert build["ratio_vs_fresh"] == pytest.approx(build["median_s"] / fresh["median_s"])
    assert build["epoch_compiles"] == 1 and fresh["epoch_compiles"] == sweep["args"]["rates"]
    search = _result(parts, "sweep", "search")
    assert search["ratio_parallel_over_sequential"] == pytest.approx(
        search["parallel_s"] / search["sequential_s"]
    )
    assert search["equal_results"] and search["parallel_s"] == search["times_s"]["parallel"][0]
    ens = _result(parts, "ensemble")
    assert ens["ratio"] == pytest.approx(ens["ensemble_s_median"] / ens["one_model_s_median"])
    fit = _result(parts, "fit")
    steps = fit["steps_per_repeat"]
    assert fit["min_time_s"] == 0.02 and steps % fit["epochs_per_repeat"] == 0
    assert fit["fit_steps_per_s_median"] == pytest.approx(
        steps / statistics.median(fit["fit_times_s"])
    )
    assert fit["ratio_fit_over_hand"] == pytest.approx(
        fit["fit_steps_per_s_median"] / fit["hand_scan_steps_per_s_median"]
    )
    ts = _result(parts, "train_step", "jax")
    for arm, secs in ts["seconds"].items():
        ips = ts["images_per_repeat"] / statistics.median(secs)
        assert ts["images_per_s"][arm] == pytest.approx(ips)
        assert ts["tflops"][arm] == pytest.approx(
            ts["flops_per_step"] * ips / ts["batch_size"] / 1e12
        )
    assert ts["flops_per_step"] > 0 and ts["environment"]["platform"] == "cpu"
    upd = _result(parts, "optimizer_update", "adam")
    base = {r["impl"]: r for r in upd["rows"] if r["leaves"] == 1}["optax"]
    for r in upd["rows"]:
        assert r["call_ratio"] == pytest.approx(r["call_ms"] / base["call_ms"])
    lrf = _result(parts, "lr_finder")
    assert lrf["ratio_run"] == pytest.approx(
        lrf["finder_run_s_median"] / lrf["single_run_s_median"]
    )
    assert all(np.isfinite(v) for v in (ens["ratio"], lrf["ratio_end_to_end"]))
    demo = _result(parts, "train")
    assert [r["label"] for r in demo["runs"]] == ["cold", "warm0"]
    assert demo["cold_wall_s"] == demo["runs"][0]["process_wall_s"]
    for r in demo["runs"]:  # the run's own wall time lies inside the process's
        assert 0 < r["train_s"] <= r["cli_wall_s"] < r["process_wall_s"] and r["steps"] == 20


def test_bench_fit_lengthens_its_repeats_to_the_minimum_time(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    lasting = _load(ROOT / "benchmarks" / "bench_fit.py").lasting
    seconds = lambda epochs: 0.01 * epochs  # noqa: E731
    assert lasting(seconds, 1, 0.05) == 8  # 1, 2 and 4 epochs last under 0.05 s
    assert lasting(seconds, 10, 0.05) == 10 and lasting(seconds, 3, 0.0) == 3


def test_tiny_suite_bench_results_compare_with_the_cpu_results(suite_run):
    from jtricks.bench import compare

    out, _, _ = suite_run
    results = json.loads((out / "bench_quick.json").read_text())
    assert results["schema"] == "jtricks.bench/2" and results["gpu_suite"]["status"] == "ok"
    cpu = ROOT / "benchmarks" / "results" / "bench-quick-cpu-2core" / "results.json"
    table = compare([str(cpu), str(out / "bench_quick.json")])
    assert "regression_mlp | nadamw" in table and "speedup [1]/[0]" in table


def test_summary_checks_the_targets_against_the_figures():
    summary = _load(ROOT / "benchmarks" / "suite_summary.py")
    row = {"optimizer": "adam", "impl": "fused", "leaves": 512, "compile_s": 3.5}
    row.update(call_ms=1.0, scan_ms=1.0, call_ratio=1.29, scan_ratio=1.31)
    ens = {"model": "cnn", "members": 8, "ratio": 2.4}
    ens.update(one_model_s_median=1.0, ensemble_s_median=2.4)
    records = {
        "optimizer_update": {"runs": [{"label": "adam", "result": {"rows": [row]}}]},
        "ensemble": {"runs": [{"label": "cnn", "result": ens}]},
    }
    lines = summary._targets(records)
    verdicts = {line.split(" | ")[0]: line.rsplit(" | ", 1)[1] for line in lines if "≤" in line}
    verdicts.update(
        {line.split(" | ")[0]: line.rsplit(" | ", 1)[1] for line in lines if "<" in line}
    )
    assert verdicts["| fused adam, 512 leaves, call / optax 1 leaf ≤ 1.3"] == "met |"
    assert verdicts["| fused adam, 512 leaves, scan / optax 1 leaf ≤ 1.3"] == "**missed** |"
    assert verdicts["| fused adam, 512 leaves, compile < 3 s"] == "**missed** |"
    assert verdicts["| ensemble cnn: 8 members / 1 ≤ 2.5"] == "met |"


def test_summary_checks_the_speed_targets():
    summary = _load(ROOT / "benchmarks" / "suite_summary.py")
    fit = [
        {"label": m, "result": {"ratio_fit_over_hand": x}}
        for m, x in (("mlp", 0.96), ("cnn", 0.94))
    ]
    jx = {"model": "resnet18", "precision": "bf16"}
    jx["ratio_vs_hand_scan"] = {"hand_scan": 1.0, "fit": 0.97, "fit_fused": 0.99}
    demo = {"runs": [{"label": "cold", "cli_wall_s": 11.5}]}
    records = {
        "fit": {"runs": fit},
        "train_step": {"runs": [{"label": "jax", "result": jx}]},
        "train": {"runs": [{"label": "defaults", "result": demo}]},
    }
    rows = [line for line in summary._targets(records) if line.startswith("| ") and "≥" in line]
    rows += [line for line in summary._targets(records) if "wall ≤" in line]
    got = {line.split(" | ")[0][2:]: line.rsplit(" | ", 1)[1] for line in rows}
    assert got == {
        "fit mlp / hand scan ≥ 0.95": "met |",
        "fit cnn / hand scan ≥ 0.95": "**missed** |",
        "resnet18 bf16 fit / hand scan ≥ 0.95": "met |",
        "resnet18 bf16 fit_fused / hand scan ≥ 1.0": "**missed** |",
        "`jtricks train` defaults, cold, wall ≤ 12 s": "met |",
    }


def test_a_run_past_its_budget_is_killed_and_recorded():
    suite = _load(SUITE)
    status, lines, wall = suite.run_process(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        2.0,
        "[test]",
    )
    assert status == "timed out after 2 s" and lines == ["started"] and wall < 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "optimizer_update,warp"], "--parts: unknown part 'warp'"),
        (["--budget", "0"], "--budget: must be a positive number"),
        (["--jobs", "0"], "--jobs: must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_folder_with_results_is_not_overwritten(tmp_path):
    (tmp_path / "summary.md").write_text("earlier results")
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "exists and is not an empty folder" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]
    assert (tmp_path / "summary.md").read_text() == "earlier results"


def test_the_torch_baseline_runs_its_logic_on_a_stand_in_torch(monkeypatch, capsys):
    """`benchmarks/baselines/torch_resnet18.py` with `tests/fake_torch.py` as ``torch``
    (CI has none): every arm warms up and is timed, the figures follow from the recorded
    times, and its model has jtricks' ResNet-18's parameter count."""
    import jax

    from jtricks.nn import build_model

    fake_torch = _load(Path(__file__).parent / "fake_torch.py")
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    script = _load(ROOT / "benchmarks" / "baselines" / "torch_resnet18.py")
    fake_torch.SGD.steps = 0
    argv = ["--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "1", "--repeats", "3"]
    argv += ["--arms", "eager,compile,compile_graphs", "--flops-per-step", "1e9"]
    result = script.main([*argv, "--peak-tflops", "100"])
    capsys.readouterr()
    assert result["errors"] == {} and result["images_per_repeat"] == 8
    assert fake_torch.SGD.steps == 3 * (1 + 3) * 2  # arms x (warm-up + repeats) x steps
    for arm, seconds in result["seconds"].items():
        assert len(seconds) == 3
        ips = result["images_per_s"][arm]
        assert ips == pytest.approx(8 / statistics.median(seconds))
        assert result["tflops"][arm] == pytest.approx(1e9 * ips / 4 / 1e12)
        assert result["mfu"][arm] == pytest.approx(result["tflops"][arm] / 100)
    model = script.resnet18(fake_torch.nn, 3, 10)
    shapes = jax.eval_shape(
        build_model("resnet18", 10).init, jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3))
    )["params"]
    assert sum(model.parameters()) == sum(a.size for a in jax.tree.leaves(shapes)) == 11_173_962
