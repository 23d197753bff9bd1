"""Cost of the vmapped LR finder: K learning rates in one program against a single-rate run.

All arms are `jtricks.diagnostics.make_lr_sweep` programs over the same steps and
batches: the single-rate arm trains one copy, the finder K copies (``jax.vmap`` over
the injected learning rate), the range test (`lr_range_test`) one copy whose rate
rises every step. Reported per arm: compile time (first call minus a steady call)
and the median steady time over ``--repeats`` (arms alternate), and the ratios
against the single-rate arm for the run alone and end to end (compile + one run,
what a user waits for).

Also measured, to bound the run-only ratio: the floating-point work of one step of
each arm (XLA's cost analysis of a one-step sweep, ``flops_per_step_*``) and this
machine's float32 matmul rate (best of 7 2048 x 2048 ``jnp.matmul``, ``matmul_gflops``).
``ratio_run_floor`` = (finder FLOPs / matmul rate) / single run time: the ratio the
finder would reach if it ran every FLOP at the matmul rate, so no implementation of
K independent copies can do better on this machine.

    python benchmarks/bench_lr_finder.py                       # paper CNN, K=32, 200 steps
    python benchmarks/bench_lr_finder.py --model mlp --json-out results.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from timing import time_arms, write_result

from jtricks.bench.device import lowered_flops, matmul_flops
from jtricks.data import Scaler, load_dataset
from jtricks.diagnostics import make_lr_sweep
from jtricks.nn import build_model
from jtricks.optim import build_optimizer
from jtricks.run import environment


def step_flops(one_step, lrs: jax.Array) -> float:
    """FLOPs of one train step of every copy: XLA's cost analysis of a one-step sweep's
    lowered module (`lowered_flops`: convolutions counted on a GPU too)."""
    return lowered_flops(one_step.lower(lrs)) or 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--num", type=int, default=32, help="K, the number of learning rates")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    data = load_dataset(args.dataset)
    x = Scaler.fit("standardize", data.x_train)(data.x_train)
    model = build_model(args.model, data.num_classes)

    def sweep(steps: int):
        def tx(lr):
            return build_optimizer(args.optimizer, lr)

        data_ = (x, data.y_train)
        key = jax.random.key(0)
        return make_lr_sweep(model, tx, data_, key=key, steps=steps, batch_size=args.batch_size)

    run = sweep(args.steps)
    arms = {
        "single": jnp.asarray([1e-2], jnp.float32),
        "finder": jnp.asarray(np.geomspace(1e-5, 1.0, args.num), jnp.float32),
        "range": jnp.asarray(np.geomspace(1e-7, 10.0, args.steps)[None], jnp.float32),
    }

    one_step = sweep(1)
    flops = {
        name: step_flops(one_step, lrs[..., :1] if lrs.ndim == 2 else lrs)
        for name, lrs in arms.items()
    }

    def timed(lrs) -> float:
        t = time.perf_counter()
        jax.block_until_ready(run(lrs))
        return time.perf_counter() - t

    first = {name: timed(lrs) for name, lrs in arms.items()}  # compiles each shape once
    times = time_arms({name: partial(timed, lrs) for name, lrs in arms.items()}, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    gflops = matmul_flops() / 1e9
    floor = flops["finder"] * args.steps / (gflops * 1e9) / med["single"]
    compile_s = {name: max(first[name] - med[name], 0.0) for name in arms}
    result = {
        "benchmark": "bench_lr_finder",
        "model": args.model,
        "optimizer": args.optimizer,
        "num": args.num,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "single_run_s_median": med["single"],
        "finder_run_s_median": med["finder"],
        "single_compile_s": compile_s["single"],
        "finder_compile_s": compile_s["finder"],
        "ratio_run": med["finder"] / med["single"],
        "ratio_end_to_end": (first["finder"]) / (first["single"]),
        "range_run_s_median": med["range"],
        "range_compile_s": compile_s["range"],
        "ratio_range_run": med["range"] / med["single"],
        "ratio_range_end_to_end": first["range"] / first["single"],
        "flops_per_step_single": flops["single"],
        "flops_per_step_finder": flops["finder"],
        "matmul_gflops": gflops,
        "single_gflops": flops["single"] * args.steps / med["single"] / 1e9,
        "finder_gflops": flops["finder"] * args.steps / med["finder"] / 1e9,
        "range_gflops": flops["range"] * args.steps / med["range"] / 1e9,
        "ratio_run_floor": floor,
        "times_s": times,
        "environment": environment(),
    }
    report(result, args, med, compile_s, flops)
    return result


def report(result: dict, args, med: dict, compile_s: dict, flops: dict) -> None:
    """The JSON line, the table and the ratios, and the JSON file when asked."""
    gflops, floor = result["matmul_gflops"], result["ratio_run_floor"]
    print(json.dumps(result))
    print(f"\n{'arm':<16}{'run s (median)':>16}{'compile s':>12}{'MFLOP/step':>12}{'GFLOP/s':>10}")
    for name, label in (
        ("single", "1 rate"),
        ("finder", f"{args.num} rates"),
        ("range", "range test"),
    ):
        print(
            f"{label:<16}{med[name]:>16.3f}{compile_s[name]:>12.2f}"
            f"{flops[name] / 1e6:>12.1f}{result[name + '_gflops']:>10.1f}"
        )
    print(
        f"ratio {args.num} rates / 1 rate: run {result['ratio_run']:.2f}x, "
        f"end to end {result['ratio_end_to_end']:.2f}x   device: {result['environment']['device_kind']}"
    )
    print(
        f"ratio range test / 1 rate: run {result['ratio_range_run']:.2f}x, "
        f"end to end {result['ratio_range_end_to_end']:.2f}x"
    )
    print(
        f"matmul rate {gflops:.0f} GFLOP/s: at that rate the run-only ratio would be "
        f"{floor:.2f}x (the floor on this machine)"
    )
    write_result(result, args.json_out)


if __name__ == "__main__":
    main()
