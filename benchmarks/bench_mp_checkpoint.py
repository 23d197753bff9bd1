"""Checkpoints of a multi-process run written in the background against in step.

Two processes on localhost (CPU collectives through gloo; ``jax.distributed``) train the
same MLP data-parallel with `fit`, a `jtricks.training.Checkpointer` saving every epoch
(and ``best/``): arm ``step`` with ``background=False`` (each save finishes before the
next epoch starts), arm ``background`` with ``background=True`` (orbax writes while the
next epoch trains; the writer threads of the processes meet at coordination-service
barriers). The time is `fit`'s, on process 0, from the first epoch to the last write on
disk (``on_train_end`` waits for every write), after a warm-up `fit` that compiled the
programs. Arms alternate; medians over ``--repeats``; the final parameters of both arms
are checked equal.

    python benchmarks/bench_mp_checkpoint.py
    python benchmarks/bench_mp_checkpoint.py --repeats 5 --json-out mp-ckpt.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("step", "background")


def worker(pid: int, port: int, arm: str, out: str, args: argparse.Namespace) -> None:
    """One process of the run: warm up, then time `fit` with the arm's `Checkpointer`."""
    import jax

    from jtricks.training.processes import initialize

    initialize(f"localhost:{port}", 2, pid)
    import numpy as np
    import optax

    from jtricks.nn import build_model
    from jtricks.training import Checkpointer, create_train_state, fit

    rng = np.random.default_rng(pid)  # each process its own shard
    x = rng.normal(size=(args.steps * args.batch_size // 2, args.inputs)).astype(np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    model = build_model(f"mlp(features=({args.width}, {args.width}))", 10)

    def fresh():
        return create_train_state(model, optax.adam(1e-3), x, jax.random.key(0))

    kw = dict(val_data=(x, y), batch_size=args.batch_size, data_key=jax.random.key(1))
    fit(fresh(), (x, y), epochs=1, **kw)  # compiles the epoch and evaluation programs
    ckpt = Checkpointer(Path(out) / "ckpt", every=1, background=arm == "background")
    state = fresh()
    t0 = time.perf_counter()
    state, _ = fit(state, (x, y), epochs=args.epochs, callbacks=[ckpt], **kw)
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(state.params)
    checksum = float(sum(np.asarray(a, np.float64).sum() for a in leaves))
    params = sum(a.size for a in leaves)
    print(json.dumps({"seconds": seconds, "checksum": checksum, "params": params}))


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--port",
            str(port),
            "--arm",
            arm,
            "--out",
            out,
            *passthrough(args),
        ]
        procs = [
            subprocess.Popen([*cmd, "--pid", str(i)], stdout=subprocess.PIPE, text=True, env=env)
            for i in range(2)
        ]
        outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(
                f"arm {arm}: a process failed (status {[p.returncode for p in procs]})"
            )
        return json.loads(outs[0].strip().splitlines()[-1])


def passthrough(args: argparse.Namespace) -> list[str]:
    names = ("epochs", "steps", "batch_size", "inputs", "width")
    return [a for n in names for a in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--arm", default="step", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.pid, args.port, args.arm, args.out, args)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    sums: dict[str, set[float]] = {arm: set() for arm in ARMS}
    params = None
    for _ in range(args.repeats):
        for arm in ARMS:  # alternating
            got = run_arm(arm, args)
            times[arm].append(got["seconds"])
            sums[arm].add(got["checksum"])
            params = got["params"]
    med = {arm: statistics.median(times[arm]) for arm in ARMS}
    result = {
        "benchmark": "bench_mp_checkpoint",
        "processes": 2,
        "params": params,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "seconds": times,
        "median_s": med,
        "ratio_background_vs_step": med["background"] / med["step"],
        "same_parameters": len(sums["step"] | sums["background"]) == 1,
    }
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'arm':<12}{'median fit s':>14}{'ratio':>9}")
    for arm in ARMS:
        print(f"{arm:<12}{med[arm]:>14.3f}{med[arm] / med['step']:>9.3f}")


if __name__ == "__main__":
    main()
