"""The benchmark's reports: ``results.md`` (`markdown`), ``curves.png`` and
``profile.png`` (`plot`), and the side-by-side tables of ``jtricks bench compare``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jtricks.bench.algoperf import SCHEMA as V2_SCHEMA
from jtricks.bench.algoperf_report import compare_rows
from jtricks.bench.runner import SCHEMA
from jtricks.errors import ConfigError
from jtricks.plotting import pyplot, save_figure


def _section(title: str, first: str, columns: list[str]) -> list[str]:
    """A titled Markdown table's head: an optional ``first`` column, then ``columns``."""
    rule = "| --- " if first else ""
    return [
        "",
        title,
        "",
        first + "| " + " | ".join(columns) + " |",
        rule + "| " + " | ".join("---:" for _ in columns) + " |",
    ]


def _fmt_time(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables: time-to-target, scores, overhead, throughput."""
    env = results["environment"]
    opts = results["optimizers"]
    lines = [
        f"# jtricks bench — suite `{results['suite']}`",
        "",
        f"Device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); "
        f"jax {env['jax']}, jaxlib {env['jaxlib']}; {results['protocol']['seeds']} seeds; "
        f"suite wall time {results.get('wall_s', float('nan')):.0f} s.",
        "",
    ]
    if results["runs"]:
        lines += [
            "Median time-to-target in seconds without compilation (learning rate tuned on "
            "the validation split; seeds that reached the target; `—`: not reached).",
            "",
            "| problem | target | " + " | ".join(opts) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in opts) + " |",
        ]
        by = {(r["problem"], r["optimizer"]): r for r in results["runs"]}
        for p in results["problems"]:
            if p["kind"] != "optimize":
                continue
            cells = []
            for o in opts:
                r = by.get((p["name"], o))
                cells.append(
                    "n/a"
                    if r is None
                    else f"{_fmt_time(r['median_time_to_target_s'])} (lr {r['lr']:.2g}, {r['reached']}/{len(r['seeds'])})"
                )
            lines.append(
                f"| {p['name']} | {p['metric']} {'≤' if p['metric'] == 'loss' else '≥'} {p['target']:g} | "
                + " | ".join(cells)
                + " |"
            )
        sc = results["scores"].get("score", {})
        lines += _section(
            "Performance-profile score over tau in [1, 4] (1 = fastest on every problem):",
            "",
            opts,
        )
        lines.append("| " + " | ".join(f"{sc.get(o, float('nan')):.3f}" for o in opts) + " |")
    ov = results["scores"].get("overhead_vs_sgd", {})
    if ov:
        lines += _section(
            "Runtime per step relative to SGD on the same problem (DeepOBS overhead):",
            "| problem ",
            opts,
        )
        for p, row in ov.items():
            lines.append(
                f"| {p} | " + " | ".join(f"{row.get(o, float('nan')):.2f}" for o in opts) + " |"
            )
    if results.get("throughput"):
        lines += [
            "",
            "| throughput problem | optimizer | batch | images/s | MFU | compile s |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for t in results["throughput"]:
            mfu = "—" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
            lines.append(
                f"| {t['problem']} | {t['optimizer']} | {t['batch_size']} | {t['images_per_s']:,.0f} | {mfu} | {t['compile_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> None:
    """``curves.png`` (validation metric against steps, every seed) and ``profile.png``."""
    plt = pyplot()

    optim = [p for p in results["problems"] if p["kind"] == "optimize"]
    if optim:
        cols = min(3, len(optim))
        rows = -(-len(optim) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
        for ax, p in zip(axes.flat, optim, strict=False):
            for i, o in enumerate(results["optimizers"]):
                for r in results["runs"]:
                    if r["problem"] == p["name"] and r["optimizer"] == o:
                        for j, s in enumerate(r["seeds"]):
                            ax.plot(
                                s["steps"],
                                s["metric"],
                                color=f"C{i}",
                                alpha=0.8,
                                label=o if j == 0 else None,
                            )
            ax.axhline(p["target"], color="k", ls=":", lw=1)
            ax.set(title=p["name"], xlabel="step", ylabel=f"validation {p['metric']}")
            if p["metric"] == "loss":
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(optim) :]:
            ax.axis("off")
        save_figure(fig, out / "curves.png", axes=list(axes.flat)[: len(optim)])
    prof = results["scores"].get("profile")
    if prof:
        fig, ax = plt.subplots(figsize=(6, 4))
        for o in results["optimizers"]:
            ax.step(
                prof["taus"],
                prof[o],
                where="post",
                label=f"{o} ({results['scores']['score'][o]:.2f})",
            )
        ax.set(
            xlabel="tau (time-to-target / best)",
            ylabel="fraction of problems",
            title="performance profile",
            ylim=(0, 1.05),
        )
        save_figure(fig, out / "profile.png", axes=(ax,))


def _load(paths: list[str]) -> list[dict[str, Any]]:
    """Result files of one protocol (v1 or v2), or a `ConfigError` naming the odd one."""
    if len(paths) < 2:
        raise ConfigError("compare needs at least two results.json files", param="compare")
    loaded = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read bench results {path!r}: {e}", param="compare") from None
        if data.get("schema") not in (SCHEMA, V2_SCHEMA):
            raise ConfigError(
                f"{path!r} is not a jtricks bench results file (schema {data.get('schema')!r}, "
                f"expected {SCHEMA!r} or {V2_SCHEMA!r})",
                param="compare",
            )
        loaded.append(data)
    if len({d["schema"] for d in loaded}) > 1:
        raise ConfigError(
            "compare needs result files of one protocol; got schemas "
            + ", ".join(sorted({d["schema"] for d in loaded})),
            param="compare",
        )
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
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(cells + speed) + " |")
    return [*lines, ""]


def compare(paths: list[str]) -> str:
    """Side-by-side tables across result files (e.g. CPU vs GPU), with speedups vs the first."""
    loaded = _load(paths)
    labels = [f"{d['environment']['device_kind']} [{i}]" for i, d in enumerate(loaded)]
    lines = ["files: " + "; ".join(f"[{i}] {p}" for i, p in enumerate(paths)), ""]

    def shared(maps: list[dict]) -> list:
        return [k for k in maps[0] if all(k in m for m in maps[1:])]

    if loaded[0]["schema"] == V2_SCHEMA:
        times = [compare_rows(d) for d in loaded]
        title = "workload time, s (speedup = first / other)"
        lines += _table(labels, title, shared(times), times, "| workload | algorithm | ")
        return "\n".join(lines)
    head = "| problem | optimizer | "
    rate = [{(r["problem"], r["optimizer"]): r["steps_per_s"] for r in d["runs"]} for d in loaded]
    ttt = [
        {(r["problem"], r["optimizer"]): r["median_time_to_target_s"] for r in d["runs"]}
        for d in loaded
    ]
    imgs = [
        {(t["problem"], t["optimizer"]): t["images_per_s"] for t in d.get("throughput", [])}
        for d in loaded
    ]
    keys, tkeys = shared(rate), shared(imgs)
    if keys:
        lines += _table(labels, "steps/s (median over seeds)", keys, rate, head)
        title = "time-to-target, s without compilation (speedup = first / other)"
        lines += _table(labels, title, keys, ttt, head)
    if tkeys:
        lines += _table(labels, "images/s", tkeys, imgs, head)
    if not keys and not tkeys:
        lines.append("no (problem, optimizer) pair is present in every file")
    return "\n".join(lines)
