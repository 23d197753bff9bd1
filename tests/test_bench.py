"""`jtricks bench`: scoring maths on hand-made tables, `compare`, the CLI's bad input."""

from __future__ import annotations

import json
import math

import pytest

from jtricks.bench import (
    SCHEMA,
    compare,
    jsonable,
    performance_profile,
    performance_ratios,
    profile_score,
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


def test_compare_prints_side_by_side_with_speedups(tmp_path):
    a = {
        "schema": SCHEMA,
        "environment": {"device_kind": "cpu"},
        "workload_times": {"w": {"adamw": 8.0, "nadamw": math.inf}, "v": {"adamw": 2.0}},
    }
    b = json.loads(json.dumps(jsonable(a)))  # a file as written: inf as null
    b["environment"]["device_kind"] = "FakeGPU"
    b["workload_times"] = {"w": {"adamw": 2.0, "nadamw": 1.0}}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(jsonable(a)))
    pb.write_text(json.dumps(b))
    text = compare([str(pa), str(pb)])
    assert "FakeGPU [1]" in text and "speedup [1]/[0]" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| w | adamw |"))
    assert row.rstrip(" |").endswith("4.00x")  # 8 s on [0], 2 s on [1]
    assert not any(ln.startswith("| v |") for ln in text.splitlines())  # not in every file
    (tmp_path / "v1.json").write_text(json.dumps({"schema": "jtricks.bench/1"}))
    with pytest.raises(ConfigError, match="retired protocol v1"):
        compare([str(pa), str(tmp_path / "v1.json")])
    with pytest.raises(ConfigError, match="at least two"):
        compare([str(pa)])


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--suite", "huge"], "suite"),
        (["--protocol", "v1"], "unrecognized arguments: --protocol"),
        (["--optimizers", "sgd"], "unrecognized arguments: --optimizers"),
        (["frobnicate"], "compare"),
    ],
)
def test_cli_bench_bad_input_exits_2(tmp_path, capsys, extra, needle):
    from jtricks.cli import main

    out = tmp_path / "b"
    try:
        status = main(["bench", *extra, "--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()
