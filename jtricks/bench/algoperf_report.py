"""Reports of protocol v2 (`jtricks.bench.algoperf`): ``results.md``, ``profile.png``,
``speedup.png`` and ``lr_sensitivity.png``, and the rows ``jtricks bench compare`` puts
side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jtricks.plotting import save_figure, subplots


def _t(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


def cell(text: Any) -> str:
    """``text`` as a Markdown table cell: a pipeline's ``|`` escaped (``adam \\| lookahead``)."""
    return str(text).replace("|", "\\|")


def markdown(results: dict[str, Any]) -> str:
    """The workload times, scores and speedups as Markdown tables."""
    algs, times, scores = results["algorithms"], results["workload_times"], results["scores"]
    env, p = results["environment"], results["protocol"]
    lines = [
        f"# jtricks bench ({results['suite']} suite, {results['ruleset']} ruleset)",
        "",
        f"Device: {env['device_kind']} ({env['platform']}); jax {env['jax']}. "
        f"{p['studies']} studies x {p['trials']} trials per algorithm and workload; "
        f"wall time {results['wall_s']:.0f} s.",
        "",
        "Workload time: the median over studies of each study's fastest trial to the "
        "validation target, in seconds, compilation included, evaluation excluded "
        "(— : not reached).",
        "",
        "| workload | target | " + " | ".join(map(cell, algs)) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in algs) + " |",
    ]
    for w in results["workloads"]:
        row = times.get(w["name"], {})
        target = f"{w['metric']} {w['target']['validation']:.4g}"
        lines.append(
            f"| {w['name']} | {target} | " + " | ".join(_t(row.get(a)) for a in algs) + " |"
        )
    speed = scores.get("speedup_vs_baseline", {})
    lines += [
        "",
        "| algorithm | profile score | workloads reached | speedup over "
        f"{p['baseline']} (geometric mean) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for a in algs:
        s = speed.get(a, {})
        n = s.get("workloads", 0)
        sp = _t(s.get("speedup")) + (f" ({n} workload{'s' * (n != 1)})" if s else "")
        lines.append(
            f"| {cell(a)} | {scores['score'].get(a, 0.0):.3f} | {scores['reached'][a]}/"
            f"{len(results['workloads'])} | {sp} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> None:
    """``profile.png``, ``speedup.png`` (when the baseline ran) and ``lr_sensitivity.png``."""
    algs, scores = results["algorithms"], results["scores"]
    prof = scores["profile"]
    fig, ax = subplots(figsize=(6, 4))
    for a in algs:
        ax.step(prof["taus"], prof[a], where="post", label=f"{a} ({scores['score'][a]:.2f})")
    ax.set(xlabel="tau (time / fastest)", ylabel="fraction of workloads", ylim=(0, 1.05))
    ax.set_title("performance profiles")
    save_figure(fig, out / "profile.png", axes=(ax,))
    speed = scores.get("speedup_vs_baseline")
    if speed:
        fig, ax = subplots(figsize=(6, 3.5))
        values = [speed[a]["speedup"] for a in algs]
        ax.bar(algs, [v if math.isfinite(v) else 0.0 for v in values], color="C0")
        ax.axhline(1.0, color="k", lw=1, ls=":")
        ax.set(ylabel=f"speedup over {results['protocol']['baseline']}")
        ax.tick_params(axis="x", labelrotation=30)
        save_figure(fig, out / "speedup.png", axes=(ax,))
    _lr_sensitivity(results, out)


def _lr_sensitivity(results: dict[str, Any], out: Path) -> None:
    """Per workload, each trial's best validation metric against its learning rate."""
    workloads = results["workloads"]
    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, w in zip(axes.flat, workloads, strict=False):
        for i, a in enumerate(results["algorithms"]):
            pts = [
                (t["hparams"]["learning_rate"], t["best_validation"])
                for t in results["trials"]
                if t["workload"] == w["name"] and t["algorithm"] == a
            ]
            pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
            if pts:
                ax.scatter(*zip(*sorted(pts), strict=True), s=14, color=f"C{i}", label=a)
        ax.axhline(w["target"]["validation"], color="k", ls=":", lw=1)
        ax.set(title=w["name"], xlabel="learning rate", ylabel=f"best validation {w['metric']}")
        ax.set_xscale("log")
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    save_figure(fig, out / "lr_sensitivity.png", axes=list(axes.flat)[: len(workloads)])


def compare_rows(data: dict[str, Any]) -> dict[tuple[str, str], float]:
    """``{(workload, algorithm): workload time}`` of a v2 results file."""
    return {(w, a): t for w, row in data["workload_times"].items() for a, t in row.items()}
