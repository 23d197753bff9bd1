"""`dev.py test`, the command CI runs, on small suites of its own: a crashed worker ends
the run (pytest-xdist would wait for it forever) and the suite runs once more; a run
past its time limit is killed; a failing test is not retried."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dev


def _suite(tmp_path: Path, body: str) -> list[str]:
    (tmp_path / "test_ok.py").write_text("def test_a():\n    pass\n")
    (tmp_path / "test_b.py").write_text(body)
    return ["-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)]


def _dev_test(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        dev.test("2", args, python=sys.executable)
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().out


def test_a_crashed_worker_ends_the_run_and_the_suite_runs_once_more(tmp_path, capsys):
    marker = tmp_path / "crashed-once"
    body = (
        "import os, pathlib\n"
        "def test_crash():\n"
        f"    m = pathlib.Path({str(marker)!r})\n"
        "    if not m.exists():\n"
        "        m.touch()\n"
        "        os.abort()\n"
    )
    code, out = _dev_test(_suite(tmp_path, body), capsys)
    assert code == 0, out  # the second run passes: the crash happened once
    assert "crashed while running 'test_b.py::test_crash'" in out
    assert (
        out.count("dev.py: a test worker crashed (above); running the whole suite once more") == 1
    )
    assert "2 passed" in out


def test_a_failing_test_is_not_retried(tmp_path, capsys):
    code, out = _dev_test(_suite(tmp_path, "def test_fails():\n    assert False\n"), capsys)
    assert code == 1 and "once more" not in out and out.count("1 failed") == 1


def test_a_run_past_its_time_limit_is_killed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JTRICKS_TEST_TIMEOUT", "3")
    body = "import time\ndef test_slow():\n    time.sleep(60)\n"
    code, out = _dev_test(_suite(tmp_path, body), capsys)
    assert code == 1 and "dev.py: the test run passed 3 s and was killed" in out
