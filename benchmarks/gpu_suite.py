"""Every accelerator figure of jtricks from one prepared command.

Runs the benchmarks that need an accelerator, one process per run and a time budget per
part, and writes its results under an output folder named after the device, e.g.
``benchmarks/results/gpu-suite-h200/``: one JSON file per part (``bench_quick.json`` for
the last, the bench's own results file with the suite's record of the run under
``gpu_suite``) and ``summary.md``, 8 files at most, so that the whole output comes back
from a remote machine in one go (a new part must keep to that). Parts, in the order they
run (the headline figures first):

1. ``fit``: `bench_fit.py`, `fit` against the hand-written scan loop (MLP, paper CNN;
   repeats of at least 0.5 s, ``--min-time``: 10 epochs last milliseconds on a GPU);
2. ``train_step``: `bench_train_step.py` on a CIFAR-shaped ResNet-18, bf16, batch 512 (the
   hand-written Flax + optax step of `baselines/flax_step.py` in a scan, `fit` and `fit
   --fused`, images/s and MFU), then `baselines/torch_resnet18.py` (PyTorch eager and
   `torch.compile` of the forward pass with the loss, without and with CUDA graphs, the
   same network and shape) when torch is importable;
3. ``train``: `bench_train_cli.py`, the wall time of ``jtricks train`` with its defaults,
   cold (dataset generated, programs compiled) and warm;
4. ``ensemble``: `bench_ensemble.py`, 8 vmapped members against 1 (paper CNN);
5. ``lr_finder``: `bench_lr_finder.py`, 32 learning rates against 1;
6. ``optimizer_update``: `bench_optimizer_update.py` at 64M float32 parameters, 1 and
   512 leaves, optax and the fused Adam update, per call and inside `lax.scan`, compile
   times;
7. ``sweep``: `bench_sweep.py`, 8 learning rates with `fit`, a new ``optax.adam`` per
   rate against optimizers equal up to their rate (one compilation); then
   `bench_search.py`, 8 search trials side by side against `jtricks.train` one after
   another and against ``--parallel 1``;
8. ``step_records``: `bench_step_records.py`, what ``fit(log_every_steps=N)`` (N = 100
   and 1) and epochs run in four parts cost against plain `fit` (paper CNN); then
   `bench_callbacks_ahead.py`, a run's checkpoints and early stopping with `fit` waiting
   for them against `fit` running the next epoch meanwhile;
9. ``bench``: ``jtricks bench --suite quick`` with the rest of the budget, its
   ``results.json`` copied as ``bench_quick.json`` so that ``jtricks bench compare`` can
   set it beside the CPU's.

Progress is printed as it goes; each part's JSON is written (atomically) as soon as it
ends, so a run cut off early still leaves the finished parts, and ``summary.md`` is
rewritten after every part. A run that fails, or outlives its budget, is recorded with
its status and the tail of its output, and the suite goes on. The environment (device,
jax / jaxlib / flax / optax / torch versions, ``XLA_FLAGS``) goes into every part's JSON
and into the summary, which also checks the standing targets (`suite_summary.py`).

The parts and their shares (`suite_parts.py`) were sized from the first H200 run
(2026-12-04, where a 480 s budget left three parts timed out and the bench unstarted) so
that the default budget of 440 s finishes every part on one H200.

On the GPU machine (Python 3.12, jax with CUDA, flax, optax, orbax-checkpoint, chex,
rich, matplotlib, torch and scikit-learn installed, no package registry), from a clone:

    # here, once: fetch the one pure-Python wheel that machine lacks
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux2014_x86_64 -d .whl mnist1d==0.0.2.post1
    # there: install it beside the image's packages, then run from the clone
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out benchmarks/results/gpu-suite-h200

The budget (``--budget``, default 440 s) is the suite's whole wall time, compilation
included; each part gets its share, and a part that would start with less than 15 s
left is skipped with a line saying so. ``--tiny`` runs the same code paths at toy
sizes on the CPU in under a minute (a test does, so the suite cannot rot).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from suite_parts import PARTS, Part, Run  # noqa: E402
from suite_summary import summary_markdown  # noqa: E402

MIN_START_S = 15.0


def device_slug() -> str:
    """``h200`` for an "NVIDIA H200" (read with nvidia-smi, so this process never
    initialises the GPU that the parts will use), ``cpu`` without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if not out:
        return "cpu"
    name = out.splitlines()[0].replace("NVIDIA", "").strip().lower()
    return "-".join(name.split()) or "gpu"


def suite_environment() -> dict:
    """Versions and flags, read without importing jax (the device is the parts')."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "torch"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "gpu": device_slug(),
    }


def _command(run: Run, argv: list[str], json_out: Path) -> list[str]:
    if run.script == "jtricks":
        return [sys.executable, "-m", "jtricks.cli", "bench", *argv, "--no-progress", "--out"]
    return [sys.executable, str(HERE / run.script), *argv, "--json-out", str(json_out)]


def _stream(proc: subprocess.Popen, prefix: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(f"{prefix} {line}", end="", flush=True)


def run_process(cmd: list[str], timeout: float, prefix: str) -> tuple[str, list[str], float]:
    """Run ``cmd`` in its own process group, echoing its output with ``prefix``; kill the
    group at ``timeout``. Returns (status, output lines, wall seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_stream, args=(proc, prefix, lines), daemon=True)
    reader.start()
    try:
        status = "ok" if proc.wait(timeout=timeout) == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {timeout:.0f} s"
    reader.join(timeout=5)
    proc.stdout.close()
    return status, lines, time.perf_counter() - t0


def _run_one(run: Run, argv: list[str], timeout: float, prefix: str, out: Path, part: str) -> dict:
    """One run of a part; a bench run's results.json becomes ``bench_<label>.json``."""
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:  # never inside out/
        json_out = Path(tmp) / "result.json"
        cmd = _command(run, argv, json_out)
        if run.script == "jtricks":
            cmd.append(str(Path(tmp) / "bench"))
            json_out = Path(tmp) / "bench" / "results.json"
        status, lines, wall = run_process(cmd, timeout, prefix)
        record = {"label": run.label, "command": _shown(cmd), "status": status, "wall_s": wall}
        if status == "ok" and json_out.exists():
            result = json.loads(json_out.read_text())
            if run.script == "jtricks":  # the results file itself, for `jtricks bench compare`
                name = f"{part}_{run.label}.json"
                _atomic_json({**result, "gpu_suite": dict(record)}, out / name)
                record["results_file"] = name
                result = _bench_digest(result)
            record["result"] = result
        elif status == "ok":
            record["status"] = "failed (no result file)"
        if (record.get("result") or {}).get("skipped"):
            record["status"] = f"skipped ({record['result']['skipped']})"
        if record["status"] != "ok":
            record["log_tail"] = lines[-25:]
        return record


def _shown(cmd: list[str]) -> str:
    rel = [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd]
    rel[0] = "python"
    return " ".join(f"'{c}'" if any(ch in c for ch in " (),") else c for c in rel)


def _bench_digest(results: dict) -> dict:
    """The headline of a ``jtricks bench`` results.json (the file itself is kept whole)."""
    return {k: results.get(k) for k in ("suite", "scores", "wall_s", "environment")}


def _atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _pass_torch_flops(run: Run, argv: list[str], done: list[dict]) -> list[str]:
    """The torch baseline gets the jax run's FLOPs per step and peak, for a like MFU."""
    if run.script != "baselines/torch_resnet18.py" or not done:
        return argv
    res = done[0].get("result") or {}
    extra = []
    if res.get("flops_per_step"):
        extra += ["--flops-per-step", repr(res["flops_per_step"])]
    if res.get("peak_tflops"):
        extra += ["--peak-tflops", repr(res["peak_tflops"])]
    return argv + extra


def run_part(part: Part, args, deadline: float, env: dict, out: Path) -> dict:
    """Run a part's runs in turn within its share of the budget (and the suite's
    deadline); write ``<part>.json``."""
    t0 = time.perf_counter()
    part_end = min(deadline, t0 + part.share * args.budget)
    done: list[dict] = []
    for run in part.runs:
        argv = run.argv(args.tiny)
        if args.tiny and not argv:
            continue
        left = part_end - time.perf_counter()
        if left < MIN_START_S:
            print(f"[{part.name}/{run.label}] skipped: {left:.0f} s of the budget left", flush=True)
            done.append({"label": run.label, "status": f"skipped ({left:.0f} s left)"})
            continue
        argv = _pass_torch_flops(run, argv, done)
        print(f"[{part.name}/{run.label}] start, budget {left:.0f} s", flush=True)
        rec = _run_one(run, argv, left, f"[{part.name}/{run.label}]", out, part.name)
        print(f"[{part.name}/{run.label}] {rec['status']} in {rec['wall_s']:.1f} s", flush=True)
        done.append(rec)
    statuses = {r["status"].split(" (")[0] for r in done}
    record = {
        "part": part.name,
        "tiny": args.tiny,
        "status": "ok" if statuses == {"ok"} else "; ".join(sorted(statuses)),
        "wall_s": time.perf_counter() - t0,
        "runs": done,
        "suite_environment": env,
    }
    if part.name != "bench":  # bench's record is inside its results files and the summary
        _atomic_json(record, out / f"{part.name}.json")
    return record


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/gpu-suite-<device>)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="whole wall time, seconds (default 440; 1200 with --tiny, whose CPU may be shared)",
    )
    p.add_argument("--parts", default=",".join(pt.name for pt in PARTS))
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, under a minute")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parts run at once (default 1, so timings are not shared; 2 with --tiny)",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    known = {pt.name for pt in PARTS}
    for n in names:
        if n not in known:
            p.error(f"--parts: unknown part {n!r}; valid: {', '.join(pt.name for pt in PARTS)}")
    if not names:
        p.error("--parts: name at least one part")
    if args.jobs is None:
        args.jobs = 2 if args.tiny else 1
    if args.budget is None:
        args.budget = 1200.0 if args.tiny else 440.0
    if args.jobs < 1:
        p.error(f"--jobs: must be at least 1, got {args.jobs}")
    if not args.budget > 0:
        p.error(f"--budget: must be a positive number of seconds, got {args.budget}")
    args.parts = names
    return args


def _prepare_out(args, env: dict) -> Path:
    name = f"gpu-suite-{env['gpu']}" + ("-tiny" if args.tiny else "")
    out = Path(args.out) if args.out else HERE / "results" / name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.stderr.write(f"gpu_suite.py: error: --out: {out} exists and is not an empty folder\n")
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    env = suite_environment()
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = _prepare_out(args, env)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    print(f"gpu_suite: {', '.join(args.parts)} -> {out}, budget {args.budget:.0f} s", flush=True)
    records: dict[str, dict] = {}
    todo = [part for part in PARTS if part.name in args.parts]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_part, part, args, deadline, env, out) for part in todo]
        for fut in concurrent.futures.as_completed(futures):
            rec = fut.result()
            records[rec["part"]] = rec
            ordered = {p.name: records[p.name] for p in todo if p.name in records}
            md = summary_markdown(ordered, env, args.tiny, time.perf_counter() - t0)
            (out / ".summary.md.tmp").write_text(md)
            os.replace(out / ".summary.md.tmp", out / "summary.md")
    print(f"\ngpu_suite: done in {time.perf_counter() - t0:.0f} s; {out / 'summary.md'}:\n")
    print(md)
    return records


if __name__ == "__main__":
    main()
