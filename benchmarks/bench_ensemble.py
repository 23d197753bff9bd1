"""Cost of a vmapped ensemble: N models in one program against one model, in one run.

Both arms run `jtricks.training.ensemble.fit_ensemble` on the same data and
batches (the one-model arm is an ensemble of 1, so the code path is the same);
``fit`` on a single `TrainState` is timed as a third reference. Compilation is
excluded (a warm-up run each); each repeat times ``--epochs`` epochs; medians
over ``--repeats``; arms alternate.

    python benchmarks/bench_ensemble.py                    # paper CNN, 8 members
    python benchmarks/bench_ensemble.py --model resnet20 --json-out results.json

Prints JSON (one object) then a short table. ``ratio`` = time(N models) / time(1 model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import optax
from timing import time_arms, write_result

from jtricks.data import Scaler, load_dataset, train_val_split
from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import create_train_state, fit
from jtricks.training.ensemble import create_ensemble, fit_ensemble


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    data = load_dataset(args.dataset)
    x_tr, y_tr, x_val, y_val = train_val_split(data.x_train, data.y_train, 0.1, seed=0)
    fixed = dict(val_data=(x_val, y_val), batch_size=args.batch_size, epochs=args.epochs)
    scaler = Scaler.fit("standardize", x_tr)
    x_tr, x_val = scaler(x_tr), scaler(x_val)
    model = build_model(args.model, data.num_classes)
    tx = optax.adam(1e-2)
    dk = jax.random.key(1)
    keys = jax.random.split(jax.random.key(0), args.members)
    steps = args.epochs * (len(y_tr) // args.batch_size)

    def run_ensemble(n: int) -> float:
        states = create_ensemble(model, tx, x_tr, keys[:n])
        t = time.perf_counter()
        states, _ = fit_ensemble(states, (x_tr, y_tr), data_key=dk, **fixed)
        jax.block_until_ready(states)
        return time.perf_counter() - t

    def run_fit() -> float:
        state = create_train_state(model, tx, x_tr, keys[0])
        t = time.perf_counter()
        state, _ = fit(state, (x_tr, y_tr), data_key=dk, **fixed)
        jax.block_until_ready(state)
        return time.perf_counter() - t

    arms = {
        "one": lambda: run_ensemble(1),
        "ensemble": lambda: run_ensemble(args.members),
        "fit": run_fit,
    }
    times = time_arms(arms, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "bench_ensemble",
        "model": args.model,
        "members": args.members,
        "batch_size": args.batch_size,
        "steps_per_repeat": steps,
        "repeats": args.repeats,
        "one_model_s_median": med["one"],
        "ensemble_s_median": med["ensemble"],
        "fit_one_model_s_median": med["fit"],
        "ratio": med["ensemble"] / med["one"],
        "ratio_vs_fit": med["ensemble"] / med["fit"],
        "times_s": times,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(f"\n{'arm':<26}{'s per repeat (median)':>22}{'steps/s':>10}")
    for k, label in (
        ("fit", "fit, 1 model"),
        ("one", "fit_ensemble, 1 model"),
        ("ensemble", f"fit_ensemble, {args.members} models"),
    ):
        print(f"{label:<26}{med[k]:>22.3f}{steps / med[k]:>10,.0f}")
    print(
        f"ratio {args.members} models / 1 model = {result['ratio']:.2f}x "
        f"(vs fit: {result['ratio_vs_fit']:.2f}x)   device: {result['environment']['device_kind']}"
    )
    write_result(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
