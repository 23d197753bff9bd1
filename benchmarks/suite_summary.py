"""``summary.md`` of `gpu_suite.py`: a status table, the standing targets checked against
the measured figures, and one short table per part, all read from the parts' records."""

from __future__ import annotations

import datetime

TARGET_FUSED_RATIO = 1.3  # fused update at 512 leaves / optax at 1 leaf, call and scan
TARGET_FUSED_COMPILE_S = 3.0
TARGET_ENSEMBLE_RATIO = 2.5  # 8 vmapped members / 1
TARGET_FIT_RATIO = 0.95  # fit / the hand-written scan (MLP, CNN, ResNet-18 bf16)
TARGET_FUSED_FIT_RATIO = 1.0  # fit --fused / the hand-written scan (ResNet-18 bf16)
TARGET_TRAIN_WALL_S = 12.0  # `jtricks train` defaults, cold, the run's own wall time
EXTRA_FIT = ("calls", "guard")  # fit part runs with tables of their own (not fit / hand)


def _results(record: dict | None) -> list[tuple[str, dict]]:
    """``(label, result)`` of a part's runs that finished."""
    if not record:
        return []
    return [(r["label"], r["result"]) for r in record["runs"] if r.get("result")]


def _device(records: dict) -> str:
    for rec in records.values():
        for _, res in _results(rec):
            env = res.get("environment") or {}
            if env.get("device_kind"):
                return f"{env['device_kind']} ({env.get('platform', '?')})"
    return "unknown (no part finished)"


def _header(records: dict, env: dict, tiny: bool, wall: float) -> list[str]:
    v = env["versions"]
    lines = [
        f"# jtricks GPU suite{' (--tiny: toy sizes, targets not meaningful)' if tiny else ''}",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {_device(records)}; {env['cpus']} CPUs ({env['machine']})",
        f"- python {env['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
        f"- XLA_FLAGS: `{env['xla_flags'] or '(none)'}`",
        f"- wall time so far: {wall:.0f} s",
        "",
        "| part | run | status | wall s |",
        "| --- | --- | --- | ---: |",
    ]
    for name, rec in records.items():
        for r in rec["runs"]:
            wall_s = f"{r['wall_s']:.1f}" if "wall_s" in r else "—"
            lines.append(f"| {name} | {r['label']} | {r['status']} | {wall_s} |")
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _targets(records: dict) -> list[str]:
    rows = []
    for _, res in _results(records.get("optimizer_update")):
        by = {(r["optimizer"], r["impl"], r["leaves"]): r for r in res["rows"]}
        for (opt, impl, leaves), r in by.items():
            if impl == "fused" and leaves == 512:
                for mode in ("call", "scan"):
                    x = r[f"{mode}_ratio"]
                    rows.append(
                        f"| fused {opt}, 512 leaves, {mode} / optax 1 leaf ≤ "
                        f"{TARGET_FUSED_RATIO} | {x:.2f}x | {_verdict(x <= TARGET_FUSED_RATIO)} |"
                    )
                c = r["compile_s"]
                rows.append(
                    f"| fused {opt}, 512 leaves, compile < {TARGET_FUSED_COMPILE_S:.0f} s "
                    f"| {c:.2f} s | {_verdict(c < TARGET_FUSED_COMPILE_S)} |"
                )
    rows += _speed_targets(records)
    for label, res in _results(records.get("ensemble")):
        x = res["ratio"]
        rows.append(
            f"| ensemble {label}: {res['members']} members / 1 ≤ {TARGET_ENSEMBLE_RATIO} "
            f"| {x:.2f}x | {_verdict(x <= TARGET_ENSEMBLE_RATIO)} |"
        )
    if not rows:
        return []
    return ["", "## Targets", "", "| target | measured | verdict |", "| --- | ---: | --- |", *rows]


def _row(what: str, shown: str, ok: bool) -> str:
    return f"| {what} | {shown} | {_verdict(ok)} |"


def _speed_targets(records: dict) -> list[str]:
    """fit against the hand-written scan, and the demo's wall time."""
    rows = []
    for label, res in _fit_runs(records):
        x = res["ratio_fit_over_hand"]
        rows.append(
            _row(
                f"fit {label} / hand scan ≥ {TARGET_FIT_RATIO}", f"{x:.3f}x", x >= TARGET_FIT_RATIO
            )
        )
    jx = dict(_results(records.get("train_step"))).get("jax") or {}
    goals = {"fit": TARGET_FIT_RATIO, "fit_fused": TARGET_FUSED_FIT_RATIO}
    for arm, x in (jx.get("ratio_vs_hand_scan") or {}).items():
        if arm in goals:
            what = f"{jx['model']} {jx['precision']} {arm} / hand scan ≥ {goals[arm]}"
            rows.append(_row(what, f"{x:.3f}x", x >= goals[arm]))
    for _, res in _results(records.get("train")):
        cold = res["runs"][0]
        rows.append(
            _row(
                f"`jtricks train` defaults, cold, wall ≤ {TARGET_TRAIN_WALL_S:.0f} s",
                f"{cold['cli_wall_s']:.1f} s",
                cold["cli_wall_s"] <= TARGET_TRAIN_WALL_S,
            )
        )
    return rows


def _optimizer_update(records: dict) -> list[str]:
    lines = []
    for _, res in _results(records.get("optimizer_update")):
        lines += [
            "",
            f"## optimizer_update: {res['total_params']:,} float32 parameters",
            "",
            "Ratios against optax at 1 leaf, same optimizer and mode, same run.",
            "",
            "| optimizer | impl | leaves | call ms | x | scan ms | x | compile s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['optimizer']} | {r['impl']} | {r['leaves']} | {r['call_ms']:.3f} "
                f"| {r['call_ratio']:.2f} | {r['scan_ms']:.3f} | {r['scan_ratio']:.2f} "
                f"| {r['compile_s']:.2f} |"
            )
    return lines


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _train_step(records: dict) -> list[str]:
    got = dict(_results(records.get("train_step")))
    jx = got.get("jax")
    if not jx:
        return []
    base = jx["images_per_s"]["hand_scan"]
    lines = [
        "",
        f"## train_step: {jx['model']} {tuple(jx['shape'])}, batch {jx['batch_size']}, "
        f"{jx['precision']}",
        "",
        f"{jx['flops_per_step'] / 1e9:.1f} GFLOP per step (XLA cost analysis of the lowered step, convolutions included); "
        f"peak {jx['peak_tflops'] or '—'} TFLOP/s; measured matmul "
        f"{jx['matmul_tflops']:.1f} TFLOP/s.",
        "",
        "| arm | images/s | / hand_scan | TFLOP/s | MFU | of matmul |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm, ips in jx["images_per_s"].items():
        lines.append(
            f"| {arm} | {ips:,.0f} | {ips / base:.3f} | {jx['tflops'][arm]:.2f} "
            f"| {_pct(jx['mfu'].get(arm))} | {_pct(jx['fraction_of_matmul'][arm])} |"
        )
    th = got.get("torch") or {}
    for arm, ips in (th.get("images_per_s") or {}).items():
        mfu = (th.get("mfu") or {}).get(arm)
        lines.append(f"| torch {arm} | {ips:,.0f} | {ips / base:.3f} | — | {_pct(mfu)} | — |")
    if th.get("skipped") or th.get("errors"):
        lines.append(f"\ntorch: {th.get('skipped') or th.get('errors')}")
    return lines


def _table(title: str, header: str, results: list, row) -> list[str]:
    """A section ``title`` with a markdown table: ``header`` then ``row(result)`` per run."""
    if not results:
        return []
    align = " | ".join(["---"] + ["---:"] * (header.count("|") - 2))
    lines = ["", f"## {title}", "", header, f"| {align} |"]
    return lines + [row(r) for _, r in results]


def _sweeps(records: dict) -> list[str]:
    """The sweep part's two tables: K rates with `fit`, and K search trials side by side."""
    runs = _results(records.get("sweep"))
    sweep = _table(
        "sweep: K learning rates with `fit`",
        "| model | rates | fresh optax.adam s | build_optimizer s | ratio | epoch compilations |",
        [(label, r) for label, r in runs if label != "search"],
        lambda r: (
            f"| {r['args']['model']} | {r['args']['rates']} "
            f"| {r['arms']['fresh']['median_s']:.2f} | {r['arms']['build']['median_s']:.2f} "
            f"| {r['arms']['build']['ratio_vs_fresh']:.2f} "
            f"| {r['arms']['fresh']['epoch_compiles']} vs {r['arms']['build']['epoch_compiles']} |"
        ),
    )
    search = _table(
        "search: K trials side by side",
        "| model | trials | train loop s | parallel=1 s | side by side s | over loop | over parallel=1 |",
        [(label, r) for label, r in runs if label == "search"],
        lambda r: (
            f"| {r['model']} | {r['trials']} | {r['sequential_s']:.2f} | {r['one_by_one_s']:.2f} "
            f"| {r['parallel_s']:.2f} | {r['ratio_parallel_over_sequential']:.3f} "
            f"| {r['ratio_parallel_over_one_by_one']:.3f} |"
        ),
    )
    return sweep + search


def _fit_runs(records: dict) -> list[tuple[str, dict]]:
    """The fit part's whole-run figures (its `EXTRA_FIT` runs have tables of their own)."""
    return [(label, r) for label, r in _results(records.get("fit")) if label not in EXTRA_FIT]


def _fit_arms(records: dict, label: str, arms: str) -> list[tuple[str, tuple[dict, str]]]:
    """One row per arm of the fit part's ``label`` run: ``(label, (result, arm))``, the
    arms being the keys of ``result[arms]``."""
    return [(k, (r, arm)) for k, r in _results(records.get("fit")) if k == label for arm in r[arms]]


def _fit_calls(records: dict) -> list[str]:
    return _table(
        "fit calls: one short `fit` call at a time, against a hand-written scan",
        "| examples | steps per call | validation | arm | ms per call | x hand-written |",
        _fit_arms(records, "calls", "median_ms"),
        lambda ra: (
            f"| {ra[0]['examples']} | {ra[0]['steps_per_call']} | {ra[0]['val_examples']} "
            f"| {ra[1]} | {ra[0]['median_ms'][ra[1]]:.2f} "
            f"| {ra[0]['ratio_to_hand_written'][ra[1]]:.2f} |"
        ),
    )


def _fit_guard(records: dict) -> list[str]:
    return _table(
        "fit guard: what the non-finite guard and the gradient norm cost a step",
        "| model | arm | ms per epoch | x hand-written | kernels per step |",
        _fit_arms(records, "guard", "arms"),
        lambda ra: (
            f"| {ra[0]['model']} | {ra[1]} | {ra[0]['arms'][ra[1]]['median_ms']:.3f} "
            f"| {ra[0]['arms'][ra[1]]['ratio_to_hand']:.3f} "
            f"| {ra[0]['arms'][ra[1]]['kernels_per_step']} |"
        ),
    )


def _simple(records: dict) -> list[str]:
    ens = _table(
        "ensemble",
        "| model | members | 1 model s | N models s | ratio |",
        _results(records.get("ensemble")),
        lambda r: (
            f"| {r['model']} | {r['members']} | {r['one_model_s_median']:.3f} "
            f"| {r['ensemble_s_median']:.3f} | {r['ratio']:.2f} |"
        ),
    )
    lrf = _table(
        "lr_finder",
        "| model | K | run ratio | end-to-end ratio | floor |",
        _results(records.get("lr_finder")),
        lambda r: (
            f"| {r['model']} | {r['num']} | {r['ratio_run']:.2f} "
            f"| {r['ratio_end_to_end']:.2f} | {r['ratio_run_floor']:.2f} |"
        ),
    )
    fit = _table(
        "fit",
        "| model | fit steps/s | hand scan steps/s | ratio |",
        _fit_runs(records),
        lambda r: (
            f"| {r['model']} | {r['fit_steps_per_s_median']:,.0f} "
            f"| {r['hand_scan_steps_per_s_median']:,.0f} | {r['ratio_fit_over_hand']:.3f} |"
        ),
    )
    train = _table(
        "train: `jtricks train` defaults",
        "| run | process wall s | run's wall s | training s | test accuracy |",
        [(r["label"], r) for _, res in _results(records.get("train")) for r in res["runs"]],
        lambda r: (
            f"| {r['label']} | {r['process_wall_s']:.1f} | {r['cli_wall_s']:.1f} "
            f"| {r['train_s']:.1f} | {r['test_accuracy']} |"
        ),
    )
    runs = _results(records.get("step_records"))
    steps = _table(
        "step_records: what per-step records and epochs in parts cost `fit`",
        "| model | every 100 steps | every step | 4 parts an epoch | ms per part boundary |",
        [(label, r) for label, r in runs if label != "callbacks"],
        lambda r: (
            f"| {r['model']} | {r['arms']['steps_every_100']['ratio_time_vs_none']:.3f} "
            f"| {r['arms']['steps_every_1']['ratio_time_vs_none']:.3f} "
            f"| {r['arms']['parts']['ratio_time_vs_none']:.3f} "
            f"| {r['parts_overhead_ms_per_boundary']:.2f} |"
        ),
    )
    ahead = _table(
        "callbacks: checkpoints and early stopping, `fit` waiting for them or running ahead",
        "| model | epochs | none s | waits s | ahead s | ahead over waits |",
        [(label, r) for label, r in runs if label == "callbacks"],
        lambda r: (
            f"| {r['model']} | {r['epochs']} | {r['arms']['none']['median_s']:.3f} "
            f"| {r['arms']['waits']['median_s']:.3f} | {r['arms']['ahead']['median_s']:.3f} "
            f"| {r['arms']['ahead']['speed_vs_waits']:.3f}x |"
        ),
    )
    return (
        fit
        + _fit_calls(records)
        + _fit_guard(records)
        + train
        + ens
        + lrf
        + _sweeps(records)
        + steps
        + ahead
    )


def _bench(records: dict) -> list[str]:
    rec = records.get("bench")
    runs = [r for r in (rec or {}).get("runs", []) if r.get("results_file")]
    if not runs:
        return []
    lines = ["", "## jtricks bench", ""]
    for r in runs:
        score = r["result"].get("scores", {}).get("score", {})
        best = ", ".join(f"{k} {v:.2f}" for k, v in sorted(score.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"- `{r['results_file']}`: suite {r['result']['suite']}, "
            f"{r['result']['wall_s']:.0f} s; scores: {best}"
        )
    lines += [
        "",
        "Side by side with the CPU's: `jtricks bench compare "
        "benchmarks/results/bench-quick-cpu-2core/results.json <this folder>/bench_quick.json`",
    ]
    return lines


def _failures(records: dict) -> list[str]:
    """The command and the last lines of output of every run that failed or timed out."""
    lines = []
    for name, rec in records.items():
        for r in rec["runs"]:
            if r.get("log_tail") is not None:
                lines += ["", f"### {name}/{r['label']}: {r['status']}", "", f"`{r['command']}`"]
                lines += ["", "```", *r["log_tail"], "```"]
    return ["", "## Failures", *lines] if lines else []


def summary_markdown(records: dict, env: dict, tiny: bool, wall: float) -> str:
    """The whole ``summary.md`` from the parts finished so far."""
    lines = _header(records, env, tiny, wall) + _targets(records)
    lines += _train_step(records) + _simple(records) + _optimizer_update(records)
    return "\n".join(lines + _bench(records) + _failures(records)) + "\n"
