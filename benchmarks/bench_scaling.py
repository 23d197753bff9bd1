"""Data-parallel scaling of `jtricks.fit`: steps/s on 1 and on N devices.

CPU (default): each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (simulated devices that
share the machine's cores, so this measures the overhead of the sharded program,
not a speed-up). ``fit`` picks the mesh itself (data axis over every device).
Compilation excluded (a warm-up run); medians over ``--repeats``.

    python benchmarks/bench_scaling.py                      # paper CNN, 1 and 8 CPU devices
    python benchmarks/bench_scaling.py --accelerator        # every visible GPU/TPU, ResNet-18,
                                                            # CIFAR-shaped data, batch 512, bf16 and float32

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args) -> dict:
    import jax
    import optax

    from jtricks.data import load_dataset
    from jtricks.nn import build_model
    from jtricks.run import environment
    from jtricks.training import create_train_state, fit

    data = load_dataset(args.dataset)
    model = build_model(args.model, data.num_classes)
    tx = optax.adam(1e-3)
    x, y = data.x_train, data.y_train
    out = {}
    for precision in args.precision.split(","):

        def timed(precision: str = precision) -> float:
            state = create_train_state(model, tx, x, jax.random.key(0))
            t = time.perf_counter()
            state, _ = fit(
                state,
                (x, y),
                batch_size=args.batch_size,
                epochs=args.epochs,
                precision=precision,
                norms=False,
            )
            jax.block_until_ready(state)
            return time.perf_counter() - t

        timed()
        times = [timed() for _ in range(args.repeats)]
        steps = args.epochs * (len(y) // args.batch_size)
        med = statistics.median(times)
        out[precision] = {
            "steps_per_s": steps / med,
            "examples_per_s": steps * args.batch_size / med,
            "times_s": times,
        }
    return {"devices": jax.device_count(), "results": out, "environment": environment()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", default="1,8", help="CPU: simulated device counts")
    p.add_argument("--precision", default=None, help="comma-separated: float32, bf16")
    p.add_argument("--accelerator", action="store_true", help="run on the visible GPUs/TPUs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.accelerator:
        defaults = (
            "resnet18",
            "synthetic(num_train=10240, num_test=512, shape=(32, 32, 3))",
            512,
            2,
            "bf16,float32",
        )
    else:
        defaults = ("cnn", "mnist1d", 96, 10, "float32")
    for name, value in zip(
        ("model", "dataset", "batch_size", "epochs", "precision"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.worker or args.accelerator:
        res = worker(args)
        if args.worker:
            print(json.dumps(res))
            return res
        runs = [res]
    else:
        runs = []
        for n in [int(v) for v in args.devices.split(",")]:
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
            )
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--model",
                args.model,
                "--dataset",
                args.dataset,
                "--batch-size",
                str(args.batch_size),
                "--epochs",
                str(args.epochs),
                "--repeats",
                str(args.repeats),
                "--precision",
                args.precision,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                sys.exit(f"worker with {n} devices failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = runs[0]["results"]
    result = {
        "benchmark": "bench_scaling",
        "model": args.model,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "epochs_per_repeat": args.epochs,
        "repeats": args.repeats,
        "runs": runs,
        "ratio_vs_first": [
            {prec: r["results"][prec]["steps_per_s"] / base[prec]["steps_per_s"] for prec in base}
            for r in runs
        ],
    }
    print(json.dumps(result))
    print(f"\n{'devices':>8}{'precision':>11}{'steps/s':>10}{'examples/s':>12}{'ratio':>8}")
    for r, ratio in zip(runs, result["ratio_vs_first"], strict=True):
        for prec, v in r["results"].items():
            print(
                f"{r['devices']:>8}{prec:>11}{v['steps_per_s']:>10,.1f}{v['examples_per_s']:>12,.0f}{ratio[prec]:>8.2f}"
            )
    print(
        f"device: {runs[0]['environment']['device_kind']}  model: {args.model}  batch {args.batch_size}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
