"""Wall time of ``jtricks train`` with its defaults, as a researcher first runs it.

Runs the command in fresh processes on one cache folder (``JTRICKS_CACHE_DIR``, a new
temporary one unless ``--cache-dir`` is given): the first run is *cold* (the MNIST-1D
dataset is generated and every program compiled), the later ones *warm* (the dataset
and JAX's persistent compilation cache are read from disk, as on a researcher's second
run). Reported per run: the process wall time measured here (interpreter start and
imports included), and the run's own ``wall_s`` and ``train_s`` from its
``summary.json``. With ``--profile`` the cold run runs under cProfile and the 30
functions of largest cumulative time are kept in the JSON.

    python benchmarks/bench_train_cli.py                       # the defaults, cold + 1 warm
    python benchmarks/bench_train_cli.py --warm 2 --json-out r.json
    python benchmarks/bench_train_cli.py --args "--steps 200"  # any `jtricks train` flags

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, JTRICKS_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_once(cache: Path, extra: list[str], tmp: Path, label: str, profile: bool) -> dict:
    """One ``jtricks train`` process; its wall time and its summary."""
    out = tmp / f"run-{label}"
    cmd = [sys.executable]
    stats = tmp / f"{label}.prof"
    if profile:
        cmd += ["-m", "cProfile", "-o", str(stats)]
    cmd += ["-m", "jtricks.cli", "train", *extra, "--no-progress", "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"jtricks train failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    record = {
        "label": label,
        "process_wall_s": wall,
        "cli_wall_s": summary["wall_s"],
        "train_s": summary["train_s"],
        "test_accuracy": summary.get("test_accuracy"),
        "steps": summary["steps"],
        "last_line": proc.stdout.strip().splitlines()[-1],
    }
    if profile:
        record["profile_top"] = _top(stats)
    return record


def _top(stats_path: Path, n: int = 30) -> list[str]:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(str(stats_path), stream=text).sort_stats("cumulative").print_stats(n)
    return [line for line in text.getvalue().splitlines() if line.strip()][-n - 1 :]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--args", default="", help="extra `jtricks train` flags (default: none)")
    p.add_argument("--warm", type=int, default=1, help="warm runs after the cold one")
    p.add_argument("--cache-dir", default=None, help="default: a new temporary folder")
    p.add_argument("--profile", action="store_true", help="profile the cold run (cProfile)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.warm < 0:
        p.error(f"--warm: must be >= 0, got {args.warm}")
    extra = shlex.split(args.args)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        runs = [run_once(cache, extra, Path(tmp), "cold", args.profile)]
        runs += [run_once(cache, extra, Path(tmp), f"warm{i}", False) for i in range(args.warm)]
    from jtricks.run import environment

    warm = [r["process_wall_s"] for r in runs[1:]]
    result = {
        "benchmark": "bench_train_cli",
        "args": args.args,
        "cold_wall_s": runs[0]["process_wall_s"],
        "warm_wall_s_median": statistics.median(warm) if warm else None,
        "runs": runs,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(f"\n{'run':<8}{'process s':>11}{'cli wall s':>12}{'train s':>9}  test accuracy")
    for r in runs:
        print(
            f"{r['label']:<8}{r['process_wall_s']:>11.1f}{r['cli_wall_s']:>12.1f}"
            f"{r['train_s']:>9.1f}  {r['test_accuracy']}"
        )
    print(f"device: {result['environment']['device_kind']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
