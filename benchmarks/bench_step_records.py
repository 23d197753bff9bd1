"""What seeing inside a run costs `fit`: per-step records and epochs run in parts.

Arms, all the same training (Adam, the MNIST-1D CNN by default, validation every epoch),
timed in turn (A B C D A B C D ...) so drift hits each alike:

* ``none``: `fit` as it runs by default, the baseline: one program per epoch, no step
  records;
* ``steps_every_100`` / ``steps_every_1``: ``fit(log_every_steps=N)``: the step's
  update and parameter norms computed every step, and every N-th step's metrics kept on
  the device as the compiled loop's outputs, moved to the host once per epoch;
* ``parts``: ``fit(chunk=steps_per_epoch // 4)``: each epoch in four programs, the host
  reading each finished part (progress, step records) while the next runs - the
  mechanism that shows progress inside long epochs, here on a short one.

Reported per arm: the median seconds of ``--epochs`` epochs over ``--repeats`` (after
one compiling call each), steps/s and the ratio of the medians against ``none`` measured
in the same run, and for ``parts`` the extra time per part boundary. The final parameters of every arm are compared with ``none``'s
(``max_param_diff``: step records must not change training).

    python benchmarks/bench_step_records.py                  # CNN, 10 epochs, 7 repeats
    python benchmarks/bench_step_records.py --model mlp --json-out steps.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax
from timing import write_result

from jtricks.data import Scaler, load_dataset, train_val_split
from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import create_train_state, fit


def arms(steps_per_epoch: int) -> dict[str, dict]:
    """Each arm's extra `fit` arguments."""
    return {
        "none": {},
        "steps_every_100": {"log_every_steps": 100},
        "steps_every_1": {"log_every_steps": 1},
        "parts": {"chunk": max(1, steps_per_epoch // 4)},
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json-out", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()

    data = load_dataset(args.dataset)
    x_tr, y_tr, x_val, y_val = train_val_split(data.x_train, data.y_train, 0.1, seed=0)
    scaler = Scaler.fit("standardize", x_tr)
    x_tr, x_val = scaler(x_tr), scaler(x_val)
    model = build_model(args.model, data.num_classes)
    tx = optax.adam(1e-3)
    steps_per_epoch = len(x_tr) // args.batch_size
    extra = arms(steps_per_epoch)

    def run(kw):
        state = create_train_state(model, tx, x_tr, jax.random.key(0))
        t = time.perf_counter()
        state, hist = fit(
            state,
            (x_tr, y_tr),
            val_data=(x_val, y_val),
            batch_size=args.batch_size,
            epochs=args.epochs,
            data_key=jax.random.key(1),
            **kw,
        )
        jax.block_until_ready(state.params)
        return time.perf_counter() - t, state, hist

    finals = {name: run(kw)[1].params for name, kw in extra.items()}  # compiles each
    times: dict[str, list[float]] = {name: [] for name in extra}
    records: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, kw in extra.items():
            seconds, _, hist = run(kw)
            times[name].append(seconds)
            records[name] = len(hist.steps)
    base = statistics.median(times["none"])
    steps = args.epochs * steps_per_epoch
    boundaries = args.epochs * (-(-steps_per_epoch // extra["parts"]["chunk"]) - 1)
    result = {
        "benchmark": "bench_step_records",
        "model": args.model,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_repeat": steps,
        "repeats": args.repeats,
        "parts_overhead_ms_per_boundary": 1e3
        * (statistics.median(times["parts"]) - base)
        / max(boundaries, 1),
        "arms": {
            name: {
                "fit_kwargs": extra[name],
                "median_s": statistics.median(times[name]),
                "steps_per_s": steps / statistics.median(times[name]),
                "ratio_time_vs_none": statistics.median(times[name]) / base,
                "step_records": records[name],
                "max_param_diff": max_diff(finals[name], finals["none"]),
                "times_s": times[name],
            }
            for name in extra
        },
        "environment": environment(),
    }
    report(result, args, steps_per_epoch)


def max_diff(a, b) -> float:
    """The largest absolute difference between two parameter trees."""
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def report(result: dict, args, steps_per_epoch: int) -> None:
    """The JSON, the table, and the JSON file when asked."""
    print(json.dumps(result, indent=1))
    print(f"\n{args.model} on {args.dataset}: {args.epochs} epochs of {steps_per_epoch} steps")
    print(f"{'arm':<17} {'median s':>9} {'steps/s':>9} {'time ratio':>11} {'records':>8}")
    for name, arm in result["arms"].items():
        print(
            f"{name:<17} {arm['median_s']:>9.3f} {arm['steps_per_s']:>9,.0f} "
            f"{arm['ratio_time_vs_none']:>11.3f} {arm['step_records']:>8}"
        )
    print(
        f"parts: {result['parts_overhead_ms_per_boundary']:.2f} ms per part boundary; "
        f"device: {result['environment']['device_kind']}"
    )
    write_result(result, args.json_out)


if __name__ == "__main__":
    main()
