"""The side-by-side tables of ``jtricks bench compare`` (a run's own ``results.md`` and
figures: `jtricks.bench.algoperf_report`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jtricks.bench.algoperf import SCHEMA
from jtricks.bench.algoperf_report import cell, compare_rows
from jtricks.errors import ConfigError


def _load(paths: list[str]) -> list[dict[str, Any]]:
    """The result files, or a `ConfigError` naming the odd one."""
    if len(paths) < 2:
        raise ConfigError("compare needs at least two results.json files", param="compare")
    loaded = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read bench results {path!r}: {e}", param="compare") from None
        if data.get("schema") != SCHEMA:
            raise ConfigError(
                f"{path!r} is not a jtricks bench results file (schema {data.get('schema')!r}, "
                f"expected {SCHEMA!r}; files of the retired protocol v1 are not compared)",
                param="compare",
            )
        loaded.append(data)
    return loaded


def _speedup(v: float | None, base: float | None, rate: bool) -> str:
    """``v / base`` for a rate (higher is faster), ``base / v`` for a time; ``—`` if unknown."""
    ok = v is not None and base is not None and math.isfinite(v) and math.isfinite(base) and v > 0
    return f"{(v / base if rate else base / v):.2f}x" if ok else "—"


def _table(labels: list[str], title: str, rows: list, maps: list[dict], head: str) -> list[str]:
    """One side-by-side table: a row per key, a column per file, then the speedups."""
    n = len(maps)
    rate = title.startswith(("steps", "images"))
    lines = [
        title,
        "",
        head
        + " | ".join(labels)
        + " | "
        + " | ".join(f"speedup [{i}]/[0]" for i in range(1, n))
        + " |",
        "| --- | --- | " + " | ".join("---:" for _ in range(2 * n - 1)) + " |",
    ]
    for k in rows:
        vals = [m.get(k) for m in maps]
        cells = [("—" if v is None or not math.isfinite(v) else f"{v:,.2f}") for v in vals]
        speed = [_speedup(v, vals[0], rate) for v in vals[1:]]
        lines.append(f"| {cell(k[0])} | {cell(k[1])} | " + " | ".join(cells + speed) + " |")
    return [*lines, ""]


def compare(paths: list[str]) -> str:
    """Side-by-side tables across result files (e.g. CPU vs GPU), with speedups vs the first."""
    loaded = _load(paths)
    labels = [f"{d['environment']['device_kind']} [{i}]" for i, d in enumerate(loaded)]
    lines = ["files: " + "; ".join(f"[{i}] {p}" for i, p in enumerate(paths)), ""]

    def shared(maps: list[dict]) -> list:
        return [k for k in maps[0] if all(k in m for m in maps[1:])]

    times = [compare_rows(d) for d in loaded]
    keys = shared(times)
    title = "workload time, s (speedup = first / other)"
    lines += _table(labels, title, keys, times, "| workload | algorithm | ")
    if not keys:
        lines.append("no (workload, algorithm) pair is present in every file")
    return "\n".join(lines)
