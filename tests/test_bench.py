"""`jtricks bench`: scoring maths on hand-made tables, the results schema, `compare`."""

from __future__ import annotations

import json
import math

import pytest

from jtricks.bench import (
    SCHEMA,
    compare,
    jsonable,
    markdown,
    performance_profile,
    performance_ratios,
    profile_score,
    run_suite,
)
from jtricks.errors import ConfigError

INF = math.inf

# three problems, three optimizers; times-to-target by hand
TIMES = {
    "p1": {"a": 1.0, "b": 2.0, "c": 8.0},
    "p2": {"a": 3.0, "b": 1.5, "c": INF},
    "p3": {"a": INF, "b": INF, "c": INF},
}


def test_ratios_profile_and_score_on_a_hand_made_table():
    r = performance_ratios(TIMES)
    assert r["p1"] == {"a": 1.0, "b": 2.0, "c": 8.0}
    assert r["p2"] == {"a": 2.0, "b": 1.0, "c": INF}
    assert all(v == INF for v in r["p3"].values())  # nobody reached the target
    prof = performance_profile(r, [1.0, 2.0, 4.0])
    assert prof == {"a": [1 / 3, 2 / 3, 2 / 3], "b": [1 / 3, 2 / 3, 2 / 3], "c": [0.0, 0.0, 0.0]}
    # area over [1, 4] by hand: a: p1 (4-1) + p2 (4-2) = 5; b: p1 (4-2) + p2 (4-1) = 5;
    # c: 8 > 4 and inf count nothing; normalised by 3 problems x 3
    s = profile_score(r, 4.0)
    assert s["a"] == pytest.approx(5 / 9) and s["b"] == pytest.approx(5 / 9) and s["c"] == 0.0
    # a single always-fastest optimizer scores exactly 1
    assert profile_score(performance_ratios({"p": {"x": 1.0, "y": 3.0}}))["x"] == 1.0
    assert profile_score(performance_ratios({"p": {"x": 1.0, "y": 3.0}}))["y"] == pytest.approx(
        1 / 3
    )
    with pytest.raises(ValueError):
        profile_score(r, 1.0)


@pytest.fixture(scope="module")
def tiny_results():
    return run_suite(
        "quick", problems=["rosenbrock", "quadratic"], optimizers=["sgd", "momentum"], seeds=2
    )


def test_results_schema(tiny_results):
    r = json.loads(json.dumps(jsonable(tiny_results), allow_nan=False))  # strict JSON
    assert r["schema"] == SCHEMA and r["suite"] == "quick"
    env = r["environment"]
    for key in ("device_kind", "platform", "jax", "jaxlib"):
        assert env[key]
    assert {p["name"] for p in r["problems"]} == {"rosenbrock", "quadratic"}
    assert len(r["runs"]) == 4
    for run in r["runs"]:
        assert run["lr"] in r["protocol"]["lr_grid"]
        assert len(run["tune_final_metric"]) == len(r["protocol"]["lr_grid"])
        assert run["compile_s"] > 0 and run["steps_per_s"] > 0
        assert len(run["seeds"]) == 2
        for s in run["seeds"]:
            assert len(s["steps"]) == len(s["metric"]) == len(s["time_s"]) == len(s["train_loss"])
            assert s["time_s"] == sorted(s["time_s"])
            if s["steps_to_target"] is not None:  # reached: the curve crosses the target there
                i = s["steps"].index(s["steps_to_target"])
                problem = next(p for p in r["problems"] if p["name"] == run["problem"])
                assert s["metric"][i] <= problem["target"]
                assert s["time_to_target_with_compile_s"] == pytest.approx(
                    s["time_to_target_s"] + run["compile_s"]
                )
            else:
                assert s["time_to_target_s"] is None
    assert set(r["scores"]["score"]) == {"sgd", "momentum"}
    assert r["scores"]["overhead_vs_sgd"]["rosenbrock"]["sgd"] == 1.0
    md = markdown(tiny_results)
    assert "| rosenbrock |" in md and "Performance-profile score" in md


def test_compare_prints_side_by_side_with_speedups(tiny_results, tmp_path):
    a = jsonable(tiny_results)
    b = json.loads(json.dumps(a))
    b["environment"]["device_kind"] = "FakeGPU"
    for run in b["runs"]:
        run["steps_per_s"] *= 4.0
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    text = compare([str(pa), str(pb)])
    assert "FakeGPU [1]" in text and "speedup [1]/[0]" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| rosenbrock | sgd |"))
    assert row.rstrip(" |").endswith("4.00x")
    with pytest.raises(ConfigError, match="schema"):
        (tmp_path / "bad.json").write_text("{}")
        compare([str(pa), str(tmp_path / "bad.json")])
    with pytest.raises(ConfigError, match="at least two"):
        compare([str(pa)])


def test_cli_bench_and_compare(tmp_path, capsys):
    from jtricks.cli import main

    out = tmp_path / "b1"
    args = ["bench", "--protocol", "v1", "--problems", "rosenbrock", "--optimizers", "sgd,adam"]
    args += ["--seeds", "1"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    for name in ("results.json", "results.md", "curves.png", "profile.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()
    assert main(["bench", "compare", str(out / "results.json"), str(out / "results.json")]) == 0
    assert "1.00x" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--suite", "huge"], "--suite"),
        (["--protocol", "v1", "--problems", "nope"], "--problems"),
        (["--protocol", "v1", "--optimizers", "lion"], "--optimizers"),
        (["--protocol", "v1", "--seeds", "0"], "--seeds"),
        (["frobnicate"], "compare"),
    ],
)
def test_cli_bench_bad_input_exits_2(tmp_path, capsys, extra, needle):
    from jtricks.cli import main

    out = tmp_path / "b"
    assert main(["bench", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()
